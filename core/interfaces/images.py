"""Opening images with an explicit allow-list of formats: the one way vlmr1 reads image files and bytes.

PIL's ``Image.open`` tries every format it knows. Some of them hand the file to external
programs (EPS and PS go to Ghostscript) or to rarely exercised decoders, so an image named
``x.png`` in a data set, or a "PNG" data URL sent to the server, could be a PostScript program.
:func:`open_image` asks PIL for :data:`IMAGE_FORMATS` only (what VLM data sets and chat clients
use); anything else is refused from its first bytes, before any decoder runs. Data loading
(the file tasks, :meth:`Sample.load_images <core.interfaces.Sample.load_images>`) and the
server's data-URL decoding all go through it.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

#: PIL format names :func:`open_image` accepts (MPO, how PIL reads many camera JPEGs, comes with JPEG).
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF")

#: First bytes of formats people try to pass as images, to say what was refused.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"), (b"<svg", "SVG"),
    (b"<?xml", "XML/SVG"), (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"), (b"\x97JB2", "JBIG2"),
)


class ImageFormatError(ValueError):
    """An image that is not a regular file or not in one of the allowed formats.

    ``detail`` is the message without the image's name (for callers that name it themselves).
    """

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name} {detail}")
        self.detail = detail


def _describe(head: bytes) -> str:
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return f" (it looks like {name})"
    return " (empty)" if not head else ""


def open_image(src: str | os.PathLike[str] | bytes, *, formats: Sequence[str] = IMAGE_FORMATS) -> Image.Image:
    """Open an image file path or its bytes lazily (header only) if it is in one of ``formats``.

    Args:
        src: a path, or the encoded image bytes (e.g. a decoded data URL).
        formats: PIL format names to try (default :data:`IMAGE_FORMATS`).

    Returns:
        The opened (not yet decoded) PIL image; the caller checks its size, loads and closes it.

    Raises:
        ImageFormatError: ``src`` is not a regular file (a FIFO or device would block or never
            end), or is not an image in ``formats``; no decoder outside ``formats`` ever ran.
        OSError: the file cannot be read; PIL's ``DecompressionBombError`` propagates as raised.
    """
    from PIL import Image, UnidentifiedImageError

    Image.init()
    # PIL opens MPO through its JPEG opener (there is no OPEN entry named MPO to ask for).
    allowed = [f.upper() for f in formats if f.upper() in Image.OPEN]
    if isinstance(src, bytes | bytearray):
        fp: io.BytesIO | str = io.BytesIO(bytes(src))
        name, head = "the image data", bytes(src[:8])
    else:
        name = fp = os.fspath(src)
        st = os.stat(fp)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, socket or device?)"
            raise ImageFormatError(f"image {name}", f"is {kind}")
        with open(fp, "rb") as f:
            head = f.read(8)
    try:
        return Image.open(fp, formats=allowed)
    except UnidentifiedImageError:
        raise ImageFormatError(name, f"is not an image in an accepted format ({', '.join(allowed)})"
                                     f"{_describe(head)}") from None
