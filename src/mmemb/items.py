"""Items (one side of a pair), pairs, ranking tasks, and safe image loading.

An :class:`Item` is what gets embedded: an instruction, optional text, optional images (or a
video as a list of frames) and, during training, an optional teacher-forced rationale.
Images stay as given (PIL image, path, bytes or data URL) until :func:`load_image` opens them,
so a corrupt image fails its own item with a named reason and nothing else.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Union

from PIL import Image, ImageOps, UnidentifiedImageError

from .defaults import MAX_IMAGE_PIXELS as DEFAULT_MAX_IMAGE_PIXELS

ImageLike = Union[Image.Image, str, os.PathLike, bytes]


class ImageError(ValueError):
    """An image could not be used; the message says why."""


class ItemError(ValueError):
    """An item could not be encoded. Names the item (position and id) and the reason."""

    def __init__(self, index: int | None, item_id: str | None, reason: str):
        self.index, self.item_id, self.reason = index, item_id, reason
        where = "item" if index is None else f"item {index}"
        if item_id is not None:
            where += f" (id {item_id!r})"
        super().__init__(f"{where}: {reason}")


@dataclass
class Item:
    """One input to embed.

    ``images`` holds still images; ``video`` holds the frames of one video (a list of images).
    ``rationale`` is reasoning text to teacher-force (training, selection); at inference the
    model writes its own.
    """

    text: str | None = None
    images: list[ImageLike] = field(default_factory=list)
    instruction: str | None = None
    video: list[ImageLike] | None = None
    rationale: str | None = None
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.images, (str, bytes, os.PathLike, Image.Image)):
            self.images = [self.images]
        self.images = list(self.images or [])
        if self.video is not None:
            self.video = list(self.video)

    @property
    def has_visual(self) -> bool:
        return bool(self.images) or bool(self.video)

    def content_key(self) -> tuple:
        """A hashable key of what the model sees (used to deduplicate candidates)."""
        return (
            self.instruction or "",
            self.text or "",
            tuple(_image_key(i) for i in self.images),
            tuple(_image_key(i) for i in self.video or ()),
            self.rationale or "",
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly dict; images must be paths (PIL images and bytes are not written)."""
        out: dict[str, Any] = {}
        for key in ("id", "instruction", "text", "rationale"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.images:
            out["images"] = [_path_for_json(i) for i in self.images]
        if self.video:
            out["video"] = [_path_for_json(i) for i in self.video]
        if self.meta:
            out["meta"] = self.meta
        return out

    @classmethod
    def from_json(cls, row: dict[str, Any], root: str | os.PathLike | None = None) -> "Item":
        """Build an item from a JSON row; relative image paths are resolved against ``root``.

        A row that is not an object, has an unknown field or a field of the wrong type is refused
        with a ValueError naming the field.
        """
        if not isinstance(row, dict):
            raise ValueError(f"an item must be a JSON object, not {_json_type(row)}")
        unknown = set(row) - ITEM_FIELDS
        if unknown:
            raise ValueError(f"unknown item field(s): {sorted(unknown)}")
        _check_types(row)
        images = row.get("images") or []
        if isinstance(images, str):
            images = [images]
        if row.get("image") is not None:
            images = [row["image"]] + list(images)
        video = row.get("video")
        return cls(
            id=None if row.get("id") is None else str(row["id"]),
            instruction=row.get("instruction"),
            text=row.get("text"),
            rationale=row.get("rationale"),
            images=[_resolve(i, root) for i in images],
            video=None if video is None else [_resolve(i, root) for i in video],
            meta=dict(row.get("meta") or {}),
        )


ITEM_FIELDS = {"id", "instruction", "text", "rationale", "images", "image", "video", "meta"}
# What each field may hold (None is always allowed). Images are paths or data URLs in JSON; a dict
# built in Python may also hold PIL images or bytes.
_FIELD_TYPES = {"id": "id", "instruction": "str", "text": "str", "rationale": "str", "image": "image",
                "images": "images", "video": "frames", "meta": "dict"}
_WANTED = {"id": "a string or an integer", "str": "a string", "image": "an image path",
           "images": "an image path or a list of them", "frames": "a list of image paths", "dict": "an object"}


def _check_types(row: dict[str, Any]) -> None:
    for key, kind in _FIELD_TYPES.items():
        value = row.get(key)
        if value is None:
            continue
        ok = {"id": isinstance(value, (str, int)) and not isinstance(value, bool),
              "str": isinstance(value, str),
              "image": _is_image(value),
              "images": _is_image(value) or _is_image_list(value),
              "frames": _is_image_list(value),
              "dict": isinstance(value, dict)}[kind]
        if not ok:
            raise ValueError(f"field {key!r} must be {_WANTED[kind]}, not {_json_type(value)}")


def _is_image(value: Any) -> bool:
    return isinstance(value, (str, bytes, os.PathLike, Image.Image))


def _is_image_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_image(v) for v in value)


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def check_text(item: Item) -> None:
    """Refuse (with an ItemError) text fields that are not strings or not valid Unicode (lone
    surrogates, e.g. from a ``\\udc80`` escape): the tokenizer would fail the whole batch on them."""
    for key in ("instruction", "text", "rationale"):
        value = getattr(item, key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ItemError(None, item.id, f"{key} must be a string, not {type(value).__name__}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ItemError(None, item.id, f"{key} is not valid Unicode text "
                                           f"(lone surrogate {value[e.start]!r} at character {e.start})") from None


@dataclass
class Pair:
    """A training pair: a query, its positive target, optional hard negatives.

    ``label`` is the counterfactual selection's verdict (``"reason"`` / ``"direct"``) when known;
    a selected rationale travels as ``query.rationale``.
    """

    query: Item
    positive: Item
    negatives: list[Item] = field(default_factory=list)
    dataset: str = "default"
    id: str | None = None
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def with_rationale(self, text: str | None, label: str | None = None) -> "Pair":
        """This pair with ``text`` as the query's rationale (None: none) and ``label`` as its verdict."""
        return replace(self, query=replace(self.query, rationale=text), label=label)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "dataset": self.dataset, "query": self.query.to_json(),
                               "positive": self.positive.to_json()}
        if self.negatives:
            out["negatives"] = [n.to_json() for n in self.negatives]
        if self.label is not None:
            out["label"] = self.label
        if self.meta:
            out["meta"] = self.meta
        return out

    @classmethod
    def from_json(cls, row: dict[str, Any], root: str | os.PathLike | None = None) -> "Pair":
        for key in ("query", "positive"):
            if key not in row:
                raise ValueError(f"pair row has no {key!r}")
        return cls(
            query=Item.from_json(row["query"], root),
            positive=Item.from_json(row["positive"], root),
            negatives=[Item.from_json(n, root) for n in row.get("negatives", [])],
            dataset=row.get("dataset", "default"),
            id=None if row.get("id") is None else str(row["id"]),
            label=row.get("label"),
            meta=dict(row.get("meta") or {}),
        )


@dataclass
class RankingTask:
    """An evaluation task: each query ranks candidates; ``relevance[qid][cid]`` grades them.

    ``eval_type`` is ``"local"`` (each query ranks ``candidate_lists[qid]``) or ``"global"``
    (each query ranks every candidate).
    """

    name: str
    queries: list[Item]
    candidates: list[Item]
    relevance: dict[str, dict[str, float]]
    eval_type: str = "local"
    metric: str = "hit@1"
    candidate_lists: dict[str, list[str]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.eval_type not in ("local", "global"):
            raise ValueError(f"eval_type must be 'local' or 'global', not {self.eval_type!r}")
        if self.eval_type == "local" and self.candidate_lists is None:
            raise ValueError(f"task {self.name}: local ranking needs candidate_lists")


def as_item(x: Any) -> Item:
    """Accept an Item, a string (text), a PIL image, an image path or a JSON-like dict."""
    if isinstance(x, Item):
        return x
    if isinstance(x, str):
        return Item(text=x)
    if isinstance(x, Image.Image):
        return Item(images=[x])
    if isinstance(x, Path):
        return Item(images=[x])
    if isinstance(x, dict):
        return Item.from_json(x)
    raise TypeError(f"cannot make an Item from {type(x).__name__}")


def as_items(xs: Iterable[Any]) -> list[Item]:
    if isinstance(xs, (str, Item, Image.Image, dict)):
        xs = [xs]
    return [as_item(x) for x in xs]


def load_image(src: ImageLike, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image safely: size checked before decoding, EXIF orientation applied, RGB.

    Raises :class:`ImageError` naming the reason (missing, empty, corrupt, truncated, too large).
    """
    if isinstance(src, Image.Image):
        _check_pixels(src.size, max_pixels)
        return _finish(src)
    if isinstance(src, bytes):
        if not src:
            raise ImageError("empty image data")
        return _decode(io.BytesIO(src), max_pixels)
    if isinstance(src, str) and src.startswith("data:"):
        return _decode(io.BytesIO(_data_url_bytes(src)), max_pixels)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        if path.stat().st_size == 0:
            raise ImageError(f"empty image file: {path}")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ImageError(f"cannot read image file {path}: {e.strerror or e}") from None
        try:
            return _decode(io.BytesIO(data), max_pixels)
        except ImageError as e:
            raise ImageError(f"{e} (file {path})") from None
    raise ImageError(f"unsupported image type {type(src).__name__}")


def load_visuals(item: Item, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[list[Image.Image], list[Image.Image] | None]:
    """Load an item's images and video frames, naming which one failed."""
    images = _load_each(item.images, "image", max_pixels)
    frames = None
    if item.video is not None:
        if not item.video:
            folder = item.meta.get("video")
            raise ImageError("video has no frames" + (f" (nothing in {folder})" if folder else ""))
        frames = _load_each(item.video, "video frame", max_pixels)
        size = frames[0].size  # a video's frames share one size
        frames = [f if f.size == size else f.resize(size) for f in frames]
    return images, frames


def _load_each(sources: list[ImageLike], label: str, max_pixels: int) -> list[Image.Image]:
    out = []
    for k, src in enumerate(sources):
        try:
            out.append(load_image(src, max_pixels))
        except ImageError as e:
            raise ImageError(f"{label} {k}: {e}") from None
    return out


def image_to_data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def _data_url_bytes(url: str) -> bytes:
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise ImageError("data URL must be base64-encoded")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("invalid base64 in data URL") from None
    if not data:
        raise ImageError("empty image data")
    return data


def _decode(buf: io.BytesIO, max_pixels: int) -> Image.Image:
    # PIL raises many kinds of errors on damaged data (OSError "Truncated File Read" or "could not
    # create decoder object" while it reads a header, SyntaxError, ValueError, struct.error,
    # EOFError ...), at open, at load or at convert: every one becomes an ImageError.
    try:
        img = Image.open(buf)
    except UnidentifiedImageError:
        raise ImageError("cannot identify image data (corrupt or not an image)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}") from None
    except Exception as e:
        raise ImageError(f"corrupt image header ({_describe(e)})") from None
    _check_pixels(img.size, max_pixels)
    return _finish(img)


def _describe(e: Exception) -> str:
    return str(e) or type(e).__name__


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"image of {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")


def _finish(img: Image.Image) -> Image.Image:
    """Decode the pixels (an image opened lazily may fail only now), apply the EXIF orientation, RGB."""
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return img if img.mode == "RGB" else img.convert("RGB")
    except Exception as e:
        raise ImageError(f"corrupt or truncated image ({_describe(e)})") from None


def _image_key(src: ImageLike) -> Any:
    if isinstance(src, Image.Image):
        return ("pil", src.mode, src.size, hash(src.tobytes()))
    if isinstance(src, bytes):
        return ("bytes", hash(src))
    return ("path", os.fspath(src))


def _path_for_json(src: ImageLike) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    raise TypeError("only image paths can be written to JSON")


def _resolve(src: Any, root: str | os.PathLike | None) -> Any:
    if root is None or not isinstance(src, str) or src.startswith("data:"):
        return src
    p = Path(src)
    return str(p if p.is_absolute() else Path(root) / p)
