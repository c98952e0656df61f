"""PIL's bicubic resize of a padded image, reproduced exactly, in memory that follows the image's size.

The original pads an image to a square canvas of its longer side and resizes the canvas to 448 x 448 with PIL's
bicubic filter. For an extreme shape the canvas dwarfs the image (a 1 x 100000 image gives a 100000 x 100000 canvas,
40 GB in PIL), although it is the constant background almost everywhere. :func:`resize_window` computes the same
uint8 pixels from the image alone, and only the output pixels asked for (the centre crop of "square" mode).

It follows Pillow's resampling (``libImaging/Resample.c``) operation by operation. Per output pixel, the filter
weights are computed in float64 in Pillow's order, divided by their sequential sum and rounded half away from zero
to 22-bit fixed point. Each pass, horizontal then vertical, sums integer products onto 2**21, shifts right by 22 and
clips to 0..255; the vertical pass reads the horizontal pass's 8-bit output. The sums are exact integers below 2**53,
so they are computed as float64 matrix products (any summation order gives the same integer). Where a filter window
covers background, that part of the sum is the background value times those weights' total, so only the image's
pixels are multiplied. Tests compare the result with PIL's resize of the real canvas, bit for bit.

Only numpy is needed (this module is shipped with the remote-code model).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

import numpy as np

PRECISION_BITS = 22
"""Pillow's fixed-point precision for 8-bit images (32 - 8 - 2)."""

BICUBIC_SUPPORT = 2.0
_HALF = float(1 << (PRECISION_BITS - 1))
_ONE = float(1 << PRECISION_BITS)
_OUTPUTS_PER_PRODUCT = 16
_BLOCK_ELEMENTS = 1 << 22
"""Most pixel values converted to float64 at once (32 MB)."""


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (a = -0.5), with its operation order."""
    x = np.abs(x)
    near = ((1.5 * x - 2.5) * x) * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _geometry(in_size: int, out_size: int) -> tuple[float, float, float]:
    """(scale, support, 1 / filter scale) of a resize from ``in_size`` to ``out_size`` pixels."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    return scale, BICUBIC_SUPPORT * filterscale, 1.0 / filterscale


def bicubic_bounds(in_size: int, out_size: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """First and past-the-last input pixel of the filter window of outputs ``first .. first + count - 1``."""
    scale, support, _ = _geometry(in_size, out_size)
    centers = (np.arange(first, first + count) + 0.5) * scale
    starts = np.maximum(np.trunc(centers - support + 0.5), 0).astype(np.int64)
    stops = np.minimum(np.trunc(centers + support + 0.5), in_size).astype(np.int64)
    return starts, stops


def bicubic_taps(in_size: int, out_size: int, first: int, count: int) -> Iterator[tuple[int, np.ndarray]]:
    """Per output ``first .. first + count - 1``: the first input pixel of its window and the window's fixed-point
    weights as float64 integers (Pillow's ``precompute_coeffs`` and ``normalize_coeffs_8bpc``). Lazy: one window
    at a time, however long the axis."""
    scale, _, inverse = _geometry(in_size, out_size)
    starts, stops = bicubic_bounds(in_size, out_size, first, count)
    for index, start, stop in zip(range(first, first + count), starts.tolist(), stops.tolist()):
        center = (index + 0.5) * scale
        weights = _bicubic((np.arange(start, stop, dtype=np.float64) - center + 0.5) * inverse)
        total = np.cumsum(weights)[-1] if len(weights) else 0.0
        if total != 0.0:
            weights = weights / total
        scaled = weights * _ONE
        yield start, np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5))


def _clip8(sums: np.ndarray) -> np.ndarray:
    """Pillow's ``clip8``: fixed-point sums (exact integers in float64) shifted right by 22 and clipped to 0..255."""
    return np.clip(np.floor(sums / _ONE), 0, 255).astype(np.uint8)


def _weight_totals(taps: Iterable[tuple[int, np.ndarray]]) -> np.ndarray:
    return np.array([weights.sum() for _, weights in taps], dtype=np.float64)


def _resample_axis(values: np.ndarray, axis: int, origin: int, taps: Iterable[tuple[int, np.ndarray]],
                   outside: np.ndarray) -> np.ndarray:
    """One pass along ``axis`` (0 or 1) of ``values`` [*, *, 3] uint8, the image's stretch of a canvas axis that
    starts at canvas position ``origin``; ``outside`` (broadcastable to the other axis and the channels) is the
    canvas value off that stretch. Returns the uint8 outputs of ``taps`` in place of ``axis``."""
    length, lines = values.shape[axis], values.shape[1 - axis]
    outside = np.broadcast_to(outside, (lines, 3))
    taps = iter(taps)
    results = []
    while block := list(islice(taps, _OUTPUTS_PER_PRODUCT)):
        low = max(min(start for start, _ in block), origin)
        high = min(max(start + len(weights) for start, weights in block), origin + length)
        matrix = np.zeros((max(high - low, 0), len(block)))
        off_image = np.empty(len(block))
        for column, (start, weights) in enumerate(block):
            first, stop = max(start, low), min(start + len(weights), high)
            if first < stop:
                matrix[first - low : stop - low, column] = weights[first - start : stop - start]
            off_image[column] = weights.sum() - matrix[:, column].sum()
        result = np.empty((len(block), lines, 3), dtype=np.uint8)
        step = max(1, _BLOCK_ELEMENTS // (3 * max(high - low, len(block))))
        for line in range(0, lines, step):
            sums = _HALF + off_image[:, None, None] * outside[None, line : line + step]
            if high > low:
                span = slice(low - origin, high - origin)
                if axis == 0:
                    part = np.asarray(values[span, line : line + step], dtype=np.float64)
                    sums += (matrix.T @ part.reshape(high - low, -1)).reshape(len(block), -1, 3)
                else:
                    part = np.asarray(values[line : line + step, span].transpose(0, 2, 1), dtype=np.float64,
                                      order="C")
                    sums += (part.reshape(-1, high - low) @ matrix).reshape(-1, 3, len(block)).transpose(2, 0, 1)
            result[:, line : line + step] = _clip8(sums)
        results.append(result)
    return np.moveaxis(np.concatenate(results), 0, axis)


def resize_window(
    pixels: np.ndarray,
    *,
    canvas: tuple[int, int],
    offset: tuple[int, int] = (0, 0),
    background: tuple[int, int, int] = (0, 0, 0),
    size: tuple[int, int],
    window: tuple[int, int, int, int],
) -> np.ndarray:
    """Pixels ``window`` = (left, top, width, height) of ``canvas_image.resize(size, Image.BICUBIC)``, as uint8
    [height, width, 3], where ``canvas_image`` is a ``canvas`` = (width, height) image of ``background`` with the RGB
    ``pixels`` [h, w, 3] pasted at ``offset`` = (left, top); the canvas is never built.

    Valid where PIL resamples horizontally first: always before Pillow 13; from Pillow 13 on, unless the height
    shrinks by more than twice as many pixels as the width (then PIL runs the vertical pass first, and this function
    refuses). Memory and time grow with the image and the window, not with the canvas.
    """
    shrink_height, shrink_width = canvas[1] - size[1], canvas[0] - size[0]
    if shrink_height > 0 and shrink_height > 2 * shrink_width:
        raise ValueError(f"resizing {canvas} to {size}: PIL resamples vertically first, which is not reproduced")
    height, width = pixels.shape[:2]
    left, top = offset
    crop_left, crop_top, crop_width, crop_height = window
    background = np.asarray(background, dtype=np.float64)

    # The image rows the vertical pass reads for the window's rows.
    starts, stops = bicubic_bounds(canvas[1], size[1], crop_top, crop_height)
    row_low, row_high = max(int(starts.min()), top), min(int(stops.max()), top + height)
    # The window's columns whose horizontal filter reaches the image: elsewhere the horizontal pass gives the
    # background row (the background times each column's weight total) on every canvas row.
    starts, stops = bicubic_bounds(canvas[0], size[0], crop_left, crop_width)
    reached = np.flatnonzero((starts < left + width) & (stops > left))
    horizontal_totals = _weight_totals(bicubic_taps(canvas[0], size[0], crop_left, crop_width))
    background_row = _clip8(_HALF + horizontal_totals[:, None] * background).astype(np.float64)
    vertical_totals = _weight_totals(bicubic_taps(canvas[1], size[1], crop_top, crop_height))
    output = _clip8(_HALF + vertical_totals[:, None, None] * background_row[None])
    if row_low >= row_high or not len(reached):
        return output

    first, stop = int(reached[0]), int(reached[-1]) + 1
    horizontal = _resample_axis(pixels[row_low - top : row_high - top], 1, left,
                                bicubic_taps(canvas[0], size[0], crop_left + first, stop - first), background)
    output[:, first:stop] = _resample_axis(np.ascontiguousarray(horizontal), 0, row_low,
                                           bicubic_taps(canvas[1], size[1], crop_top, crop_height),
                                           background_row[first:stop])
    return output
