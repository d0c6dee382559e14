"""Uploads a hostile or careless client sends, each as (file name, bytes, content type)."""

import io
import os
import struct
import zlib

from PIL import Image


def _saved(image: Image.Image, image_format: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=image_format, **options)
    return out.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` pixels in a few dozen bytes: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


def hostile_uploads() -> dict[str, tuple[str, bytes, str]]:
    photo = Image.effect_noise((64, 64), 60).convert("RGB")
    jpeg = _saved(photo, "JPEG")
    return {
        "empty": ("a.jpg", b"", "image/jpeg"),
        "text": ("a.jpg", b"definitely a beetle", "image/jpeg"),
        "truncated jpeg": ("a.jpg", jpeg[: len(jpeg) // 2], "image/jpeg"),
        "random bytes": ("a.png", os.urandom(4096), "image/png"),
        "bomb png": ("a.png", _png_header_only(30_000, 30_000), "image/png"),
        "over the pixel cap": ("a.png", _png_header_only(9_400, 9_400), "image/png"),  # under Pillow's limit
        "polyglot png+html": ("a.png", _saved(photo, "PNG") + b"<script>alert(1)</script>PK\x05\x06" + b"\0" * 18, "image/png"),
        "1 px": ("a.png", _saved(Image.new("RGB", (1, 1)), "PNG"), "image/png"),
        "cmyk jpeg": ("a.jpg", _saved(photo.convert("CMYK"), "JPEG"), "image/jpeg"),
        "huge aspect": ("a.png", _saved(Image.new("RGB", (12_000, 2)), "PNG"), "image/png"),
        # feedback refuses its size from the header: it is never decoded (a decode would fail: 415)
        "huge aspect, truncated": ("a.png", _png_header_only(12_000, 2), "image/png"),
        "webp": ("a.webp", _saved(photo, "WEBP"), "image/webp"),
        "gif": ("a.gif", _saved(photo, "GIF"), "image/gif"),
        "mpo (phone jpeg)": ("a.jpg", _saved(photo, "MPO", save_all=True, append_images=[photo.rotate(90)]), "image/jpeg"),
    }


# What each gets: /predict resizes any size; feedback becomes training data, so sizes are checked.
# (A table: `duplicates` pairs its rows by their shape.)
EXPECTED = {
    "empty": (400, 400),
    "text": (415, 415),
    "truncated jpeg": (415, 415),
    "random bytes": (415, 415),
    "bomb png": (413, 413),
    "over the pixel cap": (413, 413),
    "polyglot png+html": (200, 200),
    "1 px": (200, 422),
    "cmyk jpeg": (200, 200),
    "huge aspect": (200, 422),
    "huge aspect, truncated": (415, 422),
    "webp": (415, 415),
    "gif": (415, 415),
    "mpo (phone jpeg)": (200, 200),
}
