"""Image preprocessing: file -> RGB -> square padding -> CLIP pixel values.

One path for training, batch inference, the CLI, ``score()`` and services. The pixel values equal those of
transformers' ``CLIPImageProcessor`` (PIL/numpy path) with the original ``preprocessor_config.json``, applied to the
original's padded image: pad to a square of the longer side with the CLIP-mean colour, resize the shortest edge to
448 with PIL bicubic on the uint8 image, centre crop 448 x 448, x / 255, then (x - CLIP mean) / CLIP std, channels
first, float32. The rescale + normalise step is a per-channel lookup table over the 256 uint8 values, computed with
the same float64 -> float32 arithmetic as transformers, so the results are bit-identical and fast.

transformers itself is not used here, so the pixels do not depend on its version or backends. (transformers 5 makes a
torchvision-backed ``CLIPImageProcessor`` the default when torchvision is installed; it resizes with torchvision's
antialiased bicubic, which is not bit-identical to PIL's, and its RGB conversion composites alpha onto white. Without
torchvision it falls back to ``CLIPImageProcessorPil``, which the tests compare against bit for bit.)

Hostile files: :func:`load_image` turns every failure to decode a file into an :class:`UnreadableImageError` naming
it, refuses images above PIL's decompression-bomb limit, and :func:`pixel_values` never builds an intermediate image
much larger than the image itself (an extreme shape is resized by :mod:`.resample`, with the same pixels).

This module is shipped with the remote-code model: it imports only the standard library, numpy, PIL, torch and
its sibling modules ``constants``, ``errors`` and ``resample``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .constants import CLIP_MEAN, CLIP_STD, IMAGE_BACKGROUND
from .errors import QScorerError
from .resample import resize_window

logger = logging.getLogger(__name__)

IMAGE_SIZE = 448
"""Input resolution of the vision encoder: shortest-edge resize and centre-crop size."""

RESCALE_FACTOR = 1 / 255
ASPECT_RATIO_MODES = ("pad", "square")
"""``image_aspect_ratio`` values: "pad" pads to a square first (every inference path, train_lora.sh); "square" (the
original training default) feeds the image as it is, so the centre crop cuts the long side."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

INTERMEDIATE_LIMIT = 4
"""PIL pads and resizes the whole image only while its largest intermediate image (the padded square, or the
resized image in "square" mode) holds at most this many times the pixels of the image or of the 448 x 448 output,
whichever is more; beyond that, :func:`~qscorer.model.resample.resize_window` computes the same pixels without it."""


class UnreadableImageError(QScorerError):
    """An image or video file that cannot be opened or decoded; the message names the file."""


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as an 8-bit RGB image.

    Alpha is dropped, not composited: the colour stored under transparent pixels is kept, which is what PIL's
    ``convert("RGB")`` in the original dataset, ``score()`` and batch evaluation does (and transformers 4.x's
    ``convert_to_rgb``; transformers 5's composites onto white instead). 16-bit grey images (modes ``I;16*`` and
    ``I``) are scaled to 8 bits (value / 257, rounded); PIL's own conversion clips them at 255, which turns most of
    the image white.
    Palette, CMYK, grey, 1-bit and the other PIL modes use PIL's conversion. An animated image gives its first frame.
    """
    if getattr(image, "is_animated", False) and image.tell() != 0:
        image.seek(0)
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        grey = np.rint(np.clip(values, 0, 65535) / 257).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


def expand2square(image: Image.Image, background: tuple[int, int, int] = IMAGE_BACKGROUND) -> Image.Image:
    """Pad ``image`` to a square with ``background``, the image centred (offset rounded down); squares unchanged.

    A non-RGB image is converted with :func:`to_rgb` first (the original's scorer.py skipped that and failed or
    differed on grey and palette images).
    """
    image = to_rgb(image)
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(background))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def load_image(source: str | os.PathLike | BinaryIO, *, name: str | None = None) -> Image.Image:
    """Open an image file (a path, or a binary file object such as ``io.BytesIO(upload)``) and return it as RGB
    (:func:`to_rgb`); any failure is an :class:`UnreadableImageError` naming ``name`` (default: the path).

    Images of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (PIL's decompression-bomb limit, 89.5 million by
    default; ``None`` lifts it) are refused, where PIL itself only warns up to twice the limit. The limit is read,
    never changed: raise it in your own process to read larger images. EXIF orientation is not applied (the original
    did not either). Truncated files are errors.
    """
    name = str(source) if name is None else name
    try:
        with Image.open(source) as image:
            width, height = image.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and width * height > limit:
                raise UnreadableImageError(
                    f"image {name} has {width} x {height} = {width * height} pixels, more than PIL's "
                    f"decompression-bomb limit PIL.Image.MAX_IMAGE_PIXELS = {limit}; it is refused (raise that limit "
                    "to read it)"
                )
            image.load()
            return to_rgb(image).copy()
    except UnreadableImageError:
        raise
    except FileNotFoundError:
        raise UnreadableImageError(f"image file not found: {name}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImageError(f"image {name} is refused as a possible decompression bomb: {error}") from None
    except UnidentifiedImageError:
        raise UnreadableImageError(f"cannot read image {name}: not a recognised image format") from None
    except Exception as error:
        # Decoders raise many kinds of errors on damaged or hostile files (OSError, SyntaxError, struct.error,
        # IndexError, MemoryError, ...): every one of them means this file cannot be read.
        raise UnreadableImageError(f"cannot read image {name}: {type(error).__name__}: {error}") from error


def image_from_array(array: np.ndarray, name: str = "image array") -> Image.Image:
    """The RGB image of a uint8 array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (alpha dropped, as in
    :func:`to_rgb`); other shapes and dtypes are errors naming ``name``."""
    array = np.asarray(array)
    channels = array.shape[2] if array.ndim == 3 else 1
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or channels not in (1, 3, 4) or 0 in array.shape[:2]:
        raise UnreadableImageError(
            f"{name}: expected a uint8 array [H, W] or [H, W, 1|3|4], got {array.dtype} {list(array.shape)}"
        )
    if array.ndim == 3 and channels == 1:
        array = array[:, :, 0]
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)))


@functools.cache
def _normalisation_table() -> np.ndarray:
    """[3, 256] float32: ((v * 1/255 in float64 -> float32) - mean) / std in float32, as transformers computes it."""
    scaled = (np.arange(256, dtype=np.float64) * RESCALE_FACTOR).astype(np.float32)
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None]
    std = np.asarray(CLIP_STD, dtype=np.float32)[:, None]
    return (scaled[None, :] - mean) / std


def shortest_edge_size(size: tuple[int, int], edge: int = IMAGE_SIZE) -> tuple[int, int]:
    """(width, height) after resizing the shortest edge to ``edge``; the long edge becomes ``int(edge * long /
    short)``."""
    width, height = size
    if width <= height:
        return edge, int(edge * height / width)
    return int(edge * width / height), edge


def resize_shortest_edge(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """Bicubic resize so the shortest edge is ``size`` (:func:`shortest_edge_size`)."""
    new_size = shortest_edge_size(image.size, size)
    if new_size == image.size:
        return image
    return image.resize(new_size, resample=Image.BICUBIC)


def center_crop(pixels: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """The central ``size`` x ``size`` window of an [H, W, C] array (offsets rounded down)."""
    height, width = pixels.shape[:2]
    top = (height - size) // 2
    left = (width - size) // 2
    return pixels[top : top + size, left : left + size]


def resized_crop(image: Image.Image, image_aspect_ratio: str = "pad") -> np.ndarray:
    """uint8 [448, 448, 3]: the RGB ``image``, padded to a square ("pad"), resized so its shortest edge is 448
    (bicubic) and centre-cropped; memory follows the image's size (:data:`INTERMEDIATE_LIMIT`)."""
    width, height = image.size
    limit = INTERMEDIATE_LIMIT * max(width * height, IMAGE_SIZE * IMAGE_SIZE)
    output = (0, 0, IMAGE_SIZE, IMAGE_SIZE)
    if image_aspect_ratio == "pad" and width != height:
        side = max(width, height)
        if side * side <= limit:
            return center_crop(np.asarray(resize_shortest_edge(expand2square(image))))
        offset = ((side - width) // 2, (side - height) // 2)
        return resize_window(np.asarray(image), canvas=(side, side), offset=offset, background=IMAGE_BACKGROUND,
                             size=(IMAGE_SIZE, IMAGE_SIZE), window=output)
    new_width, new_height = shortest_edge_size(image.size)
    # A shortest edge of 448 or more shrinks the image; below, PIL resamples horizontally first, as resize_window.
    if new_width * new_height <= limit or min(width, height) >= IMAGE_SIZE:
        return center_crop(np.asarray(resize_shortest_edge(image)))
    crop = ((new_width - IMAGE_SIZE) // 2, (new_height - IMAGE_SIZE) // 2, IMAGE_SIZE, IMAGE_SIZE)
    return resize_window(np.asarray(image), canvas=image.size, size=(new_width, new_height), window=crop)


def pixel_values(image: Image.Image, image_aspect_ratio: str = "pad") -> np.ndarray:
    """[3, 448, 448] float32 CLIP pixel values of one image (any PIL mode).

    An image that has no pixels, or that cannot be decoded (a lazily opened file) or converted to RGB, raises
    :class:`UnreadableImageError`.
    """
    if image_aspect_ratio not in ASPECT_RATIO_MODES:
        raise QScorerError(
            f"unknown image_aspect_ratio {image_aspect_ratio!r}; choose one of {list(ASPECT_RATIO_MODES)}"
        )
    description = f"{image.mode} image of {image.width} x {image.height} pixels"
    if image.width < 1 or image.height < 1:
        raise UnreadableImageError(f"cannot use an empty {description}")
    try:
        image.load()
        image = to_rgb(image)
    except Exception as error:
        raise UnreadableImageError(f"cannot read a {description}: {type(error).__name__}: {error}") from error
    pixels = resized_crop(image, image_aspect_ratio)
    table = _normalisation_table()
    return np.stack([table[channel][pixels[:, :, channel]] for channel in range(3)])


def process_images(images: Image.Image | Sequence[Image.Image], image_aspect_ratio: str = "pad") -> torch.Tensor:
    """Float32 tensor [N, 3, 448, 448] of PIL images: RGB conversion, square padding ("pad"), CLIP preprocessing."""
    if isinstance(images, Image.Image):
        images = [images]
    if not images:
        raise QScorerError("process_images needs at least one image")
    return torch.from_numpy(np.stack([pixel_values(image, image_aspect_ratio) for image in images]))


PROCESSOR_CONFIG_FILE = "preprocessor_config.json"
PROCESSOR_CONFIG = {
    "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": list(CLIP_MEAN),
    "image_processor_type": "CLIPImageProcessor",
    "image_std": list(CLIP_STD),
    "resample": Image.BICUBIC,
    "rescale_factor": RESCALE_FACTOR,
    "size": {"shortest_edge": IMAGE_SIZE},
}
"""The ``preprocessor_config.json`` of what this module computes (the original's values, in transformers' format)."""


def _check_processor_config(config: dict, path: Path) -> None:
    """Refuse a ``preprocessor_config.json`` whose values differ from the preprocessing implemented here."""
    size, crop = config.get("size", IMAGE_SIZE), config.get("crop_size", IMAGE_SIZE)
    found = {
        "size": size if isinstance(size, int) else size.get("shortest_edge"),
        "crop_size": crop if isinstance(crop, int) else (crop.get("height"), crop.get("width")),
        "resample": config.get("resample", Image.BICUBIC),
        "rescale_factor": config.get("rescale_factor", RESCALE_FACTOR),
        "image_mean": tuple(config.get("image_mean", CLIP_MEAN)),
        "image_std": tuple(config.get("image_std", CLIP_STD)),
        **{flag: config.get(flag, True) for flag in
           ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb")},
    }
    expected = {
        "size": IMAGE_SIZE, "crop_size": (IMAGE_SIZE, IMAGE_SIZE), "resample": Image.BICUBIC,
        "rescale_factor": RESCALE_FACTOR, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        **{flag: True for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb")},
    }
    if isinstance(found["crop_size"], int):
        found["crop_size"] = (found["crop_size"], found["crop_size"])
    differences = [f"{key} {found[key]!r} (expected {value!r})" for key, value in expected.items()
                   if found[key] != value]
    if differences:
        raise QScorerError(f"{path} asks for preprocessing qscorer does not implement: {'; '.join(differences)}")


@dataclass(frozen=True)
class ImageProcessor:
    """The image processor of the original API (``load_pretrained_model`` returns one).

    Calling it on PIL images gives the pixel values of :func:`process_images`; it reads and writes
    ``preprocessor_config.json`` like transformers' ``CLIPImageProcessor`` does.
    """

    image_aspect_ratio: str = "pad"

    def __call__(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        return process_images(images, self.image_aspect_ratio)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, image_aspect_ratio: str = "pad") -> ImageProcessor:
        """Check the folder's ``preprocessor_config.json`` (if any) against the implemented preprocessing."""
        path = Path(folder) / PROCESSOR_CONFIG_FILE
        if path.is_file():
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as error:
                raise QScorerError(f"cannot read {path}: {error}") from None
            _check_processor_config(config, path)
        else:
            logger.debug("no %s in %s: using the CLIP 448 preprocessing", PROCESSOR_CONFIG_FILE, folder)
        return cls(image_aspect_ratio)

    def save_pretrained(self, folder: str | os.PathLike) -> list[str]:
        """Write ``preprocessor_config.json`` (loadable by transformers' ``CLIPImageProcessor`` too)."""
        path = Path(folder) / PROCESSOR_CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(PROCESSOR_CONFIG, indent=2, sort_keys=True, allow_nan=False) + "\n"
        path.write_text(text, encoding="utf-8")
        return [str(path)]
