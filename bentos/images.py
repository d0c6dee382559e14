"""The uploads the service takes: JPEG or PNG, within a size in bytes and in pixels, checked from
the header before anything is decoded; each refusal a 4xx that says why."""

from __future__ import annotations

import io
import warnings
from http import HTTPStatus
from pathlib import Path

from bentoml.exceptions import BentoMLException, InvalidArgument, UnprocessableEntity
from PIL import Image, UnidentifiedImageError

from ml.data.ip102 import MAX_SIDE, MIN_SIDE

# MPO: what Pillow calls the JPEGs many phones write (a JPEG with a second, depth or preview, frame)
FORMATS = {"JPEG": ("image/jpeg", ".jpg"), "MPO": ("image/jpeg", ".jpg"), "PNG": ("image/png", ".png")}
INLINE_DECODE_PIXELS = 256 * 256  # images up to this size are decoded on the event loop (0.4 ms here)


class InputTooLarge(BentoMLException):
    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class NotAnImage(BentoMLException):
    error_code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


def open_image(upload: Path | bytes, max_bytes: int, max_pixels: int) -> tuple[bytes, Image.Image]:
    """The upload's bytes (from the file BentoML wrote, or as they came) and the image with only
    its header read (format, size); 4xx errors for anything else, a size over `max_pixels`
    included. Cheap: nothing is decoded."""
    size = upload.stat().st_size if isinstance(upload, Path) else len(upload)
    if size == 0:
        raise InvalidArgument("the uploaded image is empty")
    if size > max_bytes:
        raise InputTooLarge(f"the image is {size} bytes; the limit is {max_bytes}")
    data = upload.read_bytes() if isinstance(upload, Path) else upload
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow only warns up to twice its limit
            image = Image.open(io.BytesIO(data), formats=("JPEG", "PNG"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputTooLarge(f"the image decodes to too many pixels: {error}") from error
    except (UnidentifiedImageError, OSError) as error:
        raise NotAnImage(f"not a readable JPEG or PNG image: {error}") from error
    if image.format not in FORMATS:
        raise NotAnImage(f"{image.format} images are not accepted; send JPEG or PNG")
    if image.width * image.height > max_pixels:
        raise InputTooLarge(f"the image is {image.width}x{image.height} px; the limit is {max_pixels:,} pixels")
    return data, image


def decode(image: Image.Image) -> Image.Image:
    """An opened image's pixels, read; 415 for data that does not decode (a truncated file)."""
    try:
        image.load()
    except OSError as error:
        raise NotAnImage(f"not a readable JPEG or PNG image: {error}") from error
    return image


def decodes_inline(image: Image.Image) -> bool:
    """Whether an opened image is small enough to decode and preprocess on the event loop: for
    the photos a phone app sends scaled down this takes under 0.5 ms, less than handing it to a
    thread and waiting for the interpreter lock back under load."""
    return image.width * image.height <= INLINE_DECODE_PIXELS


def check_trainable_size(width: int, height: int) -> None:
    """Feedback becomes training data: its sides must be within what the dataset suite accepts
    (a prediction takes any size: it is resized)."""
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise UnprocessableEntity(f"the image is {width}x{height} px; feedback needs sides from {MIN_SIDE} to {MAX_SIDE} px")
