"""Decode one image file into a square RGB uint8 array, or say why it cannot be.

Every mode PIL reads becomes RGB (grayscale, palette, alpha composited on white,
CMYK, 16-bit and float scaled to 8 bits); EXIF orientation is applied; the
shorter side is resized to the target size and the centre cropped to a square.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from laray.errors import DecodeError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Photos of a few hundred megapixels are legitimate; PIL's bomb check would reject them as a warning-turned-error.
Image.MAX_IMAGE_PIXELS = 1 << 30


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16"):  # declared 16-bit: scale the full range to 8 bits
        arr = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode in ("I", "F"):
        # 32-bit int or float with no declared range: 16-bit data if any value exceeds 8 bits.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _resize_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def decode_image(path: str, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(size, size, 3) uint8 RGB array and the original (width, height), or DecodeError."""
    try:
        if os.path.getsize(path) == 0:
            raise DecodeError("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                original = img.size  # before draft mode shrinks it
                # JPEG: let the decoder skip detail we would throw away (keeps >= 2x the target).
                img.draft("RGB", (2 * size, 2 * size))
                img.load()  # force a full decode: truncated files fail here, not later
                stored = img.size
                img = ImageOps.exif_transpose(img)
                if img.size != stored:  # rotated by 90 degrees: report the size as displayed
                    original = original[::-1]
                img = _to_rgb(img)
    except DecodeError:
        raise
    except FileNotFoundError:
        raise DecodeError("file not found") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except IsADirectoryError:
        raise DecodeError("is a directory") from None
    except Image.UnidentifiedImageError:
        raise DecodeError("not an image (or a format PIL cannot read)") from None
    except Exception as exc:  # PIL raises many kinds (OSError, SyntaxError, ValueError...) for broken files
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DecodeError(f"cannot decode: {message}") from None
    if min(img.size) < 1:
        raise DecodeError("empty image")
    return np.asarray(_resize_crop(img, size), dtype=np.uint8), original
