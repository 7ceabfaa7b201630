"""OpenAI chat messages <-> vlmr1's chat turns and PIL images, and the error a bad request gets.

Shared by ``core.serve`` (which answers OpenAI-style requests) and the rollout plugins that
send prompts to OpenAI-compatible servers (vLLM, xLLM): images travel as base64 ``data:``
URLs, decoded within a pixel budget read from the header before the pixels are.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from core.interfaces.images import ImageFormatError, open_image

if TYPE_CHECKING:
    from PIL import Image


class RequestError(ValueError):
    """A bad request: answered with ``status`` and an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 err_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.err_type = status, param, err_type

    def body(self) -> dict[str, Any]:
        """``{"error": {...}}`` as OpenAI servers answer."""
        return {"error": {"message": str(self), "type": self.err_type, "param": self.param, "code": self.status}}


# ---- image and message conversion (shared with the OpenAI-server rollout plugin) ---------------
def image_to_data_url(image: Image.Image, fmt: str = "png", quality: int = 95) -> str:
    """Encode a PIL image as a base64 ``data:`` URL (PNG is lossless, so the server sees the same pixels)."""
    fmt = fmt.lower()
    if fmt not in ("png", "jpeg"):
        raise ValueError(f"image format must be 'png' or 'jpeg', got {fmt!r}")
    buf = io.BytesIO()
    img = image.convert("RGB") if image.mode not in ("RGB", "L") else image
    img.save(buf, format=fmt.upper(), **({"quality": quality} if fmt == "jpeg" else {}))
    return f"data:image/{fmt};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def data_url_to_image(url: str, where: str = "image", max_pixels: int | None = None) -> Image.Image:
    """Decode a base64 ``data:`` URL to an RGB PIL image; :class:`RequestError` naming ``where`` otherwise.

    ``max_pixels`` is checked against the size in the image's header, before any pixel is decoded.
    """
    from PIL import Image, UnidentifiedImageError

    if not isinstance(url, str) or not url.startswith("data:"):
        shown = url[:60] + "..." if isinstance(url, str) and len(url) > 60 else url
        raise RequestError(f"{where}: only base64 data URLs (data:image/...;base64,...) are accepted; "
                           f"this server does not fetch {shown!r}", param=where)
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise RequestError(f"{where}: data URL is not base64-encoded (expected 'data:image/<fmt>;base64,...')",
                           param=where)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"{where}: invalid base64 in data URL: {exc}", param=where) from None
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:  # our own limit, checked below, replaces PIL's bomb warning
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = open_image(raw)  # allowed formats only: an EPS "PNG" never reaches Ghostscript
        with img:
            w, h = img.size
            if max_pixels is not None and w * h > max_pixels:
                raise RequestError(f"{where}: image of {w}x{h} = {w * h / 1e6:.1f} Mpx exceeds this server's limit "
                                   f"of {max_pixels / 1e6:.1f} Mpx per image (--max-image-pixels)", param=where)
            img.load()
            return img.convert("RGB") if img.mode != "RGB" else img.copy()
    except ImageFormatError as exc:
        raise RequestError(f"{where}: data URL does not hold an accepted image: {exc}", param=where) from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise RequestError(f"{where}: data URL does not hold a readable image: {exc}", param=where) from None


def chat_to_openai_messages(messages: Sequence[dict[str, Any]], images: Sequence[Image.Image],
                            fmt: str = "png") -> list[dict[str, Any]]:
    """Our chat format (``{"type": "image"}`` placeholders + images in order) -> OpenAI messages.

    Each placeholder becomes an ``image_url`` part holding the next image as a data URL, in
    place; a count mismatch is an error.
    """
    out: list[dict[str, Any]] = []
    it = iter(images)
    used = 0
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, str) or content is None:
            out.append({"role": msg["role"], "content": content or ""})
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            kind = part.get("type")
            if kind == "image":
                try:
                    img = next(it)
                except StopIteration:
                    raise ValueError(f"messages hold more image placeholders than the {len(images)} image(s) "
                                     "given") from None
                used += 1
                parts.append({"type": "image_url", "image_url": {"url": image_to_data_url(img, fmt)}})
            elif kind == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            else:
                raise ValueError(f"unsupported content part type {kind!r} (expected 'text' or 'image')")
        out.append({"role": msg["role"], "content": parts})
    if used != len(images):
        raise ValueError(f"{len(images)} image(s) given but the messages hold {used} image placeholder(s)")
    return out


def openai_to_chat_messages(messages: Sequence[Any], *, max_images: int | None = None,
                            max_pixels: int | None = None) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """OpenAI messages -> our chat format and the decoded images (in placeholder order).

    Raises :class:`RequestError` naming ``messages[i].content[j]`` for anything malformed, and
    for more than ``max_images`` images (counted before any is decoded) or an image over
    ``max_pixels``.
    """
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: must be a non-empty list", param="messages")
    if max_images is not None:
        count = sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
                    for part in m["content"] if isinstance(part, dict) and part.get("type") == "image_url")
        if count > max_images:
            raise RequestError(f"messages: {count} images exceed this server's limit of {max_images} per request "
                               "(--max-images)", param="messages")
    out: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RequestError(f"{where}: must be an object with 'role' and 'content'", param=where)
        role = msg.get("role")
        if role == "developer":  # OpenAI's newer name for the system turn
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise RequestError(f"{where}.role: {role!r} is not supported (system, user, assistant)",
                               param=f"{where}.role")
        content = msg.get("content")
        if content is None or isinstance(content, str):
            out.append({"role": role, "content": [{"type": "text", "text": content or ""}]})
            continue
        if not isinstance(content, list):
            raise RequestError(f"{where}.content: must be a string or a list of parts", param=f"{where}.content")
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            pw = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise RequestError(f"{pw}.text: must be a string", param=f"{pw}.text")
                parts.append({"type": "text", "text": text})
            elif kind == "image_url":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                images.append(data_url_to_image(url, f"{pw}.image_url", max_pixels))
                parts.append({"type": "image"})
            else:
                raise RequestError(f"{pw}: unsupported content part type {kind!r} (text, image_url)", param=pw)
        out.append({"role": role, "content": parts})
    return out, images
