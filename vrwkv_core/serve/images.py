"""Images of a request: base64 `data:` URLs, or files under --image-root; the server fetches nothing.

Errors are `ApiError`s: 413 for an image over the size limit, 400 for everything else
(bad base64, not an image, an http(s) URL, a path outside the root or without one).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from vrwkv_core.infer.chat import MAX_IMAGE_PIXELS
from vrwkv_core.serve.errors import ApiError

PARAM = "messages.content.image_url"


def load_image_url(url: str, image_root: Path | None, max_bytes: int) -> Image.Image:
    """The RGB image a request's `image_url.url` names (see the module docstring)."""
    if url.startswith("data:"):
        return decode_image_bytes(_data_url_bytes(url, max_bytes))
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https", "ftp"):
        raise ApiError(400, f"image URLs are not fetched ({scheme}://...): send the image as a data:image/...;base64 URL",
                       "invalid_image_url", PARAM)  # fmt: skip
    if scheme not in ("", "file") and not (len(scheme) == 1 and url[1:2] == ":"):
        raise ApiError(400, f"unsupported image URL scheme {scheme!r}", "invalid_image_url", PARAM)
    if image_root is None:
        raise ApiError(400, "image file paths are refused: the server was started without --image-root",
                       "invalid_image_url", PARAM)  # fmt: skip
    raw = unquote(urlparse(url).path) if scheme == "file" else url
    root = image_root.resolve()
    path = (root / raw).resolve()  # an absolute `raw` replaces root; resolve() follows links
    if not path.is_relative_to(root):
        raise ApiError(400, f"image path {raw!r} is outside --image-root", "invalid_image_url", PARAM)
    if not path.is_file():
        raise ApiError(400, f"image file {raw!r} not found under --image-root", "invalid_image_url", PARAM)
    size = path.stat().st_size
    if size > max_bytes:
        raise ApiError(413, f"image {raw!r} is {size:,} bytes, over the {max_bytes:,} allowed", "image_too_large", PARAM)
    return decode_image_bytes(path.read_bytes())


def _data_url_bytes(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise ApiError(400, "an image data URL must look like data:image/png;base64,...", "invalid_image_url", PARAM)
    if len(payload) * 3 // 4 > max_bytes + 3:  # checked before decoding
        raise ApiError(413, f"image is about {len(payload) * 3 // 4:,} bytes, over the {max_bytes:,} allowed",
                       "image_too_large", PARAM)  # fmt: skip
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the image data URL is not valid base64", "invalid_base64", PARAM) from None
    if len(data) > max_bytes:
        raise ApiError(413, f"image is {len(data):,} bytes, over the {max_bytes:,} allowed", "image_too_large", PARAM)
    return data


def decode_image_bytes(data: bytes) -> Image.Image:
    """Decodes image bytes to RGB (pixel count checked from the header first)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ApiError(413, f"image is {w}x{h} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed",
                                   "image_too_large", PARAM)  # fmt: skip
                im.load()
                return im.convert("RGB")
    except ApiError:
        raise
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... on bad data
        raise ApiError(400, f"not an image PIL can decode ({type(err).__name__})", "invalid_image", PARAM) from None


__all__ = ["decode_image_bytes", "load_image_url"]
