"""Image bytes as the indexer stores them: checked, kept as is when readable, else converted.

Rules (``prepare_image``):
* the bytes must decode completely with Pillow (``load()``; a truncated or corrupt file is an
  :class:`ImageRejected` with reason ``corrupt_image``), and the image must have a non-zero size
  (``zero_size_image``). A file Pillow cannot identify is named by its format where the bytes
  tell it (SVG, PDF, HEIC/AVIF, HTML, ...), never by Python object reprs, so the skip message
  is the same in every run;
* JPEG, PNG and WebP in mode ``RGB`` or ``L`` without a transparent colour are stored
  unchanged (the loader's ``convert("RGB")`` of ``L`` is exact);
* anything else is converted to RGB and re-encoded as PNG (``converted=True``): alpha (``RGBA``,
  ``LA``, ``PA``, palette with transparency, and an ``RGB``/``L``/16-bit PNG's ``tRNS`` colour
  key) is composited onto white, 16-bit and 32-bit
  integer modes are scaled to 8 bits (``v * 255 / 65535`` rounded, ``I`` and ``F`` clipped to
  the 16-bit range first), CMYK/YCbCr/LAB/1/P go through Pillow's ``convert("RGB")``, other
  formats (GIF, BMP, TIFF, ...) are re-encoded too (GIF: first frame). EXIF orientation is
  not applied (the stored pixels are the file's pixels, as InternVL's loader reads them).
PNG encoding is deterministic (Pillow, fixed settings), so re-indexing gives identical bytes.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

KEEP_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}
KEEP_MODES = ("RGB", "L")
_ADDRESS = re.compile(r" ?<[^<>]* at 0x[0-9a-fA-F]+>")
MAX_PIXELS = 1 << 28  # 268M pixels: larger is treated as a decompression bomb (rejected)


def describe_unidentified(raw: bytes) -> str:
    """Why Pillow cannot read ``raw``: the format where its first bytes tell it, else its first
    bytes in hex (deterministic: no object reprs, no memory addresses)."""
    head = raw[:1024]
    text = head.lstrip(b"\xef\xbb\xbf").lstrip().lower()
    if text.startswith(b"<svg") or (text.startswith((b"<?xml", b"<!--")) and b"<svg" in text):
        return "SVG is not supported (a vector image); convert it to PNG"
    if text.startswith((b"<!doctype html", b"<html")):
        return "an HTML page, not an image (a failed download?)"
    if head.startswith(b"%PDF"):
        return "PDF is not supported; convert its page to PNG"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF is not supported by this Pillow; convert it to PNG or JPEG"
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIC/HEIF is not supported; convert it to JPEG or PNG"
        return f"an ISO media file (brand {brand.decode('ascii', 'replace')!r}), not an image"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL ")):
        return "JPEG XL is not supported; convert it to PNG or JPEG"
    return f"not an image format Pillow reads (first bytes: {head[:8].hex(' ')})"


class ImageRejected(ValueError):
    """An image the indexer cannot store; ``reason`` is the skip reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class PreparedImage:
    data: bytes
    format: str  # "jpeg" | "png" | "webp"
    height: int
    width: int
    converted: bool


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    key = img.info.get("transparency")  # a colour key (tRNS), an index or per-index alphas
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode in ("I", "F") and arr.size and arr.max() <= 255 and arr.min() >= 0:
            scaled = arr  # 8-bit data stored in a wide mode
        else:
            scaled = np.clip(arr, 0, 65535) * (255.0 / 65535.0)
        gray = np.rint(scaled).astype(np.uint8)
        if isinstance(key, int):  # the colour key's pixels are transparent: white
            gray[arr == key] = 255
        return Image.fromarray(gray, "L").convert("RGB")
    if mode in ("P", "RGB", "L") and key is not None:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def prepare_image(raw: bytes) -> PreparedImage:
    """Check and (if needed) convert encoded image bytes; see the module doc.

    Raises:
        ImageRejected: reason ``zero_size_image`` (empty file or a 0-pixel side) or
            ``corrupt_image`` (Pillow cannot identify or fully decode it, or it is a
            decompression bomb).
    """
    if not raw:
        raise ImageRejected("zero_size_image", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            if img.width * img.height > MAX_PIXELS:
                raise ImageRejected("corrupt_image", f"{img.width}x{img.height} is too large")
            if img.width == 0 or img.height == 0:
                raise ImageRejected("zero_size_image", f"{img.width}x{img.height}")
            img.load()
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("corrupt_image", describe_unidentified(raw)) from None
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError...)
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        msg = _ADDRESS.sub("", msg)  # object reprs differ between runs and processes
        raise ImageRejected("corrupt_image", f"{type(exc).__name__}: {msg}"[:200]) from None
    fmt = KEEP_FORMATS.get(img.format or "")
    keep = img.mode in KEEP_MODES and "transparency" not in img.info
    if fmt is not None and keep and getattr(img, "n_frames", 1) == 1:
        return PreparedImage(raw, fmt, img.height, img.width, False)
    try:
        rgb = _to_rgb(img)
        out = io.BytesIO()
        rgb.save(out, format="PNG", compress_level=6)
    except Exception as exc:
        raise ImageRejected("corrupt_image", f"cannot convert mode {img.mode}: {exc}") from None
    return PreparedImage(out.getvalue(), "png", rgb.height, rgb.width, True)
