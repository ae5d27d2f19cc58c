"""Input handling: every bad-input case fails its own item with a named reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mmemb import Item
from mmemb.items import ImageError, ItemError, load_image

from .conftest import random_image


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def good_png():
    return png_bytes(random_image(np.random.default_rng(1), 16, 32))


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda good, tmp: b"", "empty image data"),
        (lambda good, tmp: b"this is not an image at all", "cannot identify image data"),
        (lambda good, tmp: good[: len(good) // 2], "corrupt or truncated"),
        (lambda good, tmp: str(tmp / "missing.png"), "image file not found"),
        (lambda good, tmp: _empty_file(tmp), "empty image file"),
        (lambda good, tmp: "data:image/png;base64,!!!notbase64", "invalid base64"),
    ],
)
def test_bad_images_named(good_png, tmp_path, make, reason):
    with pytest.raises(ImageError, match=reason):
        load_image(make(good_png, tmp_path))


def _empty_file(tmp):
    p = tmp / "empty.png"
    p.write_bytes(b"")
    return str(p)


def test_pixel_limit_checked_before_decoding(tmp_path):
    big = Image.new("RGB", (300, 300))
    with pytest.raises(ImageError, match="exceeds the limit of 50000"):
        load_image(png_bytes(big), max_pixels=50_000)
    assert load_image(png_bytes(big), max_pixels=90_000).size == (300, 300)


def test_exif_orientation_and_rgb():
    img = Image.new("L", (40, 20), color=128)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    out = load_image(buf.getvalue())
    assert out.size == (20, 40) and out.mode == "RGB"
    rgba = Image.new("RGBA", (8, 8))
    assert load_image(rgba).mode == "RGB"


def test_data_url_and_path(tmp_path, good_png):
    import base64

    url = "data:image/png;base64," + base64.b64encode(good_png).decode()
    assert load_image(url).size == (32, 16)
    p = tmp_path / "x.png"
    p.write_bytes(good_png)
    assert load_image(p).size == (32, 16)
    item = Item.from_json({"id": 7, "image": "x.png", "text": "t"}, root=tmp_path)
    assert item.id == "7" and load_image(item.images[0]).size == (32, 16)


def test_item_from_json_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown item field"):
        Item.from_json({"txt": "typo"})


def test_encode_raise_names_item(embedders, good_png):
    e = embedders["qwen3_vl"]
    items = [Item(text="fine"), Item(text="broken", images=[b"garbage"], id="q2")]
    with pytest.raises(ItemError, match=r"item 1 \(id 'q2'\): image 0: cannot identify"):
        e.encode(items, mode="direct", on_error="raise")


def test_encode_empty_item_is_an_item_error(embedders):
    with pytest.raises(ItemError, match="neither text nor images"):
        embedders["qwen3_vl"].encode([Item(instruction="only an instruction")], on_error="raise")


def test_skip_keeps_other_vectors(embedders, good_png, tmp_path):
    e = embedders["qwen3_vl"]
    good = [Item(text="alpha"), Item(images=[good_png], text="beta"), Item(text="gamma")]
    bad = [
        Item(images=[b""], id="empty"),
        Item(images=[good_png[:40]], id="truncated"),
        Item(images=[str(tmp_path / "nope.png")], id="missing"),
        Item(images=[png_bytes(Image.new("RGB", (400, 400)))], id="huge"),
    ]
    mixed = [bad[0], good[0], bad[1], good[1], bad[2], good[2], bad[3]]
    ref = e.encode(good, mode="direct")
    e.max_image_pixels, saved = 100_000, e.max_image_pixels
    try:
        r = e.encode(mixed, mode="direct", on_error="skip")
    finally:
        e.max_image_pixels = saved
    assert r.ok.tolist() == [False, True, False, True, False, True, False]
    assert sorted(err.item_id for err in r.errors) == ["empty", "huge", "missing", "truncated"]
    reasons = {err.item_id: err.reason for err in r.errors}
    assert "exceeds the limit" in reasons["huge"] and "not found" in reasons["missing"]
    np.testing.assert_allclose(r.embeddings[[1, 3, 5]], ref.embeddings, atol=1e-5)
    assert not r.embeddings[[0, 2, 4, 6]].any()


def test_pair_json_round_trip(tmp_path):
    from mmemb.items import Pair

    pair = Pair(query=Item(text="q", images=["a.png"], rationale="digits 1 2."), positive=Item(text="3"),
                negatives=[Item(text="4")], dataset="DigitSum", id="p1", label="reason", meta={"digits": [1, 2]})
    row = pair.to_json()
    back = Pair.from_json(row, root=tmp_path)
    assert back.query.images == [str(tmp_path / "a.png")] and back.query.rationale == "digits 1 2."
    assert back.label == "reason" and back.meta == {"digits": [1, 2]} and back.negatives[0].text == "4"
    with pytest.raises(ValueError, match="no 'positive'"):
        Pair.from_json({"query": {"text": "q"}})
