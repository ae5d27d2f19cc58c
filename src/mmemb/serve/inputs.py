"""A request's ``input`` -> Items with decoded images.

``input`` is a string, or a list whose entries are strings or multimodal items
``{"text", "image", "images", "video", "instruction"}``. Images are data URLs; files and http(s)
URLs are refused unless the server allows them (files only inside one root folder, after
resolving symlinks and ``..``; URLs only to public addresses unless private ones are allowed too).
Every error names the item (``input[i]``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx

from ..items import ImageError, Item, load_visuals
from .errors import APIError

ITEM_KEYS = ("text", "image", "images", "video", "instruction")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass
class SourcePolicy:
    local_root: Path | None = None  # resolved; None: no local files
    fetcher: "UrlFetcher | None" = None  # None: no URLs


def parse_input(raw: Any, default_instruction: str | None = None, max_items: int | None = None) -> list[Item]:
    """Items whose image sources are still strings (checked and loaded by the functions below)."""
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'input' must be a string or a non-empty list of strings or items", "input")
    if max_items is not None and len(raw) > max_items:
        raise APIError(400, f"'input' has {len(raw)} items; this server takes at most {max_items} per request",
                       "input", "too_many_items")
    items = []
    for i, x in enumerate(raw):
        if isinstance(x, str):
            if not x:
                raise APIError(400, f"input[{i}]: empty string", f"input[{i}]")
            items.append(Item(text=x, instruction=default_instruction))
        elif isinstance(x, dict):
            items.append(_item_from_dict(i, x, default_instruction))
        elif isinstance(x, (int, list)):
            raise APIError(400, f"input[{i}]: token-id input is not supported; send text", f"input[{i}]")
        else:
            raise APIError(400, f"input[{i}]: expected a string or an object, got {type(x).__name__}", f"input[{i}]")
    return items


def _item_from_dict(i: int, x: dict, default_instruction: str | None) -> Item:
    def fail(reason: str) -> APIError:
        return APIError(400, f"input[{i}]: {reason}", f"input[{i}]")

    unknown = sorted(set(x) - set(ITEM_KEYS))
    if unknown:
        raise fail(f"unknown field(s) {unknown}; an item has {list(ITEM_KEYS)}")
    for key in ("text", "instruction", "image"):
        if x.get(key) is not None and not isinstance(x[key], str):
            raise fail(f"'{key}' must be a string")
    for key in ("images", "video"):
        if x.get(key) is not None and not (isinstance(x[key], list) and all(isinstance(s, str) for s in x[key])):
            raise fail(f"'{key}' must be a list of strings")
    images = ([x["image"]] if x.get("image") is not None else []) + list(x.get("images") or [])
    item = Item(text=x.get("text"), images=images, video=x.get("video"),
                instruction=x.get("instruction", default_instruction))
    if not item.text and not item.has_visual:
        raise fail("an item needs a text, an image or a video")
    return item


async def resolve_sources(items: list[Item], policy: SourcePolicy) -> None:
    """Check every image source against the policy; fetch allowed URLs (in place, concurrently)."""
    fetches = []
    for i, item in enumerate(items):
        for field_name in ("images", "video"):
            sources = getattr(item, field_name) or []
            for k, src in enumerate(sources):
                kind = _source_kind(src)
                if kind == "data":
                    continue
                if kind == "url":
                    if policy.fetcher is None:
                        raise APIError(400, f"input[{i}]: image URLs are not allowed on this server "
                                            "(start it with --allow-urls)", f"input[{i}]")
                    fetches.append((i, sources, k, src))
                elif kind == "path":
                    sources[k] = _local_path(i, src, policy.local_root)
                else:
                    raise APIError(400, f"input[{i}]: unsupported image source {src[:40]!r}: use a "
                                        "data:image/...;base64 URL", f"input[{i}]")
    if fetches:
        results = await asyncio.gather(*(policy.fetcher.fetch(src) for _, _, _, src in fetches),
                                       return_exceptions=True)
        for (i, sources, k, src), result in zip(fetches, results):
            if isinstance(result, BaseException):
                reason = str(result) or type(result).__name__
                raise APIError(400, f"input[{i}]: could not fetch {src[:200]}: {reason}", f"input[{i}]")
            sources[k] = result


def load_images(items: list[Item], max_pixels: int) -> None:
    """Decode every image (in place), so that images over the pixel limit or corrupt ones fail here,
    naming the item, before the request joins a model batch. Blocking: run it in a thread."""
    for i, item in enumerate(items):
        if not item.has_visual:
            continue
        try:
            images, frames = load_visuals(item, max_pixels)
        except ImageError as e:
            raise APIError(400, f"input[{i}]: {e}", f"input[{i}]") from None
        item.images, item.video = images, frames


def _source_kind(src: str) -> str:
    if src.startswith("data:"):
        return "data"
    if src.startswith(("http://", "https://")):
        return "url"
    # A scheme other than these (file:, ftp:, ...) is refused; "C:\\..." is not a concern here.
    return "other" if _SCHEME.match(src) else "path"


def _local_path(i: int, src: str, root: Path | None) -> str:
    if root is None:
        raise APIError(400, f"input[{i}]: local file paths are not allowed on this server "
                            "(start it with --allow-local-root DIR)", f"input[{i}]")
    path = (root / src).resolve()  # an absolute src replaces root; symlinks and .. are resolved
    if not path.is_relative_to(root):
        raise APIError(400, f"input[{i}]: path {src!r} is outside the allowed root", f"input[{i}]")
    return str(path)


class UrlFetcher:
    """Downloads images over http(s) with a size cap and a timeout, from public addresses only
    unless ``allow_private`` (see :class:`PublicAddressesOnly`)."""

    def __init__(self, max_bytes: int, timeout_s: float, allow_private: bool = False,
                 resolve: "Callable[[str, int], Awaitable[list[str]]] | None" = None):
        self.max_bytes = max_bytes
        transport = httpx.AsyncHTTPTransport()
        if not allow_private:
            transport = PublicAddressesOnly(transport, resolve or resolve_host)
        # trust_env=False: a proxy from the environment would connect on the server's behalf, unchecked.
        self.client = httpx.AsyncClient(transport=transport, timeout=timeout_s, follow_redirects=True,
                                        max_redirects=3, trust_env=False)

    async def fetch(self, url: str) -> bytes:
        async with self.client.stream("GET", url) as r:
            if r.status_code != 200:
                raise ImageError(f"HTTP status {r.status_code}")
            data = bytearray()
            async for chunk in r.aiter_bytes():
                data += chunk
                if len(data) > self.max_bytes:
                    raise ImageError(f"larger than {self.max_bytes} bytes")
        if not data:
            raise ImageError("empty response")
        return bytes(data)

    async def aclose(self) -> None:
        await self.client.aclose()


class PublicAddressesOnly(httpx.AsyncBaseTransport):
    """A transport that connects only to public addresses (against server-side request forgery).

    Every request passes here, each redirect hop included: its host is resolved, refused if any
    address it resolves to is loopback, private, link-local, shared, multicast or reserved, and the
    connection goes to the address that was checked (TLS still verifies the host name), so a second
    DNS answer cannot point it elsewhere.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, resolve: Callable[[str, int], Awaitable[list[str]]]):
        self.inner, self.resolve = inner, resolve

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            addresses = await self.resolve(url.host, port)
        except OSError as e:
            raise ImageError(f"cannot resolve {url.host}: {e.strerror or e}") from None
        for address in addresses:
            kind = address_kind(address)
            if kind is not None:
                raise ImageError(f"{url.host} resolves to {address}, a {kind} address: refused (start the "
                                 "server with --allow-private-urls to allow private addresses)")
        request.url = url.copy_with(host=addresses[0])  # the Host header keeps the name
        if url.scheme == "https":
            request.extensions = {**request.extensions, "sni_hostname": url.host}
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def address_kind(address: str) -> str | None:
    """Why an address is not public ("loopback", "private", ...), or None for a public address."""
    ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 zone ("%eth0") is not part of the address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-public"
