"""The canvas-free bicubic resize equals PIL's resize of the real padded canvas, bit for bit."""

import numpy as np
import pytest
from PIL import Image

from qscorer.model.constants import IMAGE_BACKGROUND
from qscorer.model.image_processing import shortest_edge_size
from qscorer.model.resample import bicubic_taps, resize_window

SHAPES = [(1, 5), (5, 1), (1, 3000), (2900, 2), (447, 3), (3, 449), (448, 200), (37, 91), (640, 360), (1001, 333),
          (60, 1000), (2500, 700), (123, 2345), (449, 450)]
"""(width, height): single rows and columns, sides below, at and above 448, odd and even padding offsets."""


def _random_image(width, height, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _pil_padded(pixels):
    height, width = pixels.shape[:2]
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), IMAGE_BACKGROUND)
    canvas.paste(Image.fromarray(pixels), ((side - width) // 2, (side - height) // 2))
    return np.asarray(canvas.resize((448, 448), Image.BICUBIC))


@pytest.mark.parametrize("width, height", SHAPES)
def test_padded_resize_equals_pil_on_the_canvas(width, height):
    pixels = _random_image(width, height, width * 7919 + height)
    side = max(width, height)
    ours = resize_window(pixels, canvas=(side, side), offset=((side - width) // 2, (side - height) // 2),
                         background=IMAGE_BACKGROUND, size=(448, 448), window=(0, 0, 448, 448))
    assert ours.dtype == np.uint8 and np.array_equal(ours, _pil_padded(pixels))


@pytest.mark.parametrize("width, height", [(5, 1), (1, 40), (60, 1000), (1000, 60), (300, 301), (447, 900)])
def test_window_of_a_resize_without_padding_equals_pil(width, height):
    pixels = _random_image(width, height, width + height)
    size = shortest_edge_size((width, height))
    left, top = (size[0] - 448) // 2, (size[1] - 448) // 2
    expected = np.asarray(Image.fromarray(pixels).resize(size, Image.BICUBIC))[top : top + 448, left : left + 448]
    ours = resize_window(pixels, canvas=(width, height), size=size, window=(left, top, 448, 448))
    assert np.array_equal(ours, expected)


def test_taps_are_pillows_fixed_point_weights():
    # Equal sizes: bicubic(0) = 1 and bicubic(+-1) = bicubic(2) = 0, so each output copies one input.
    assert [(start, weights.tolist()) for start, weights in bicubic_taps(4, 4, 1, 2)] == [
        (0, [0, 4194304, 0, 0]), (1, [0, 4194304, 0])]  # the last window is cut at the edge
    # Halving 8 -> 4, output 0: centre 1.0, support 4, window [0, 5), kernel at (x - 0.5) / 2 = -0.25, 0.25, 0.75,
    # 1.25, 1.75 gives (111, 111, 29, -9, -3) / 128; normalised: / 239; times 2**22 and rounded half away from 0.
    # The rounded weights sum to 2**22 - 1, as in Pillow.
    start, weights = next(bicubic_taps(8, 4, 0, 1))
    assert start == 0 and weights.tolist() == [1947982, 1947982, 508932, -157945, -52648]


def test_a_vertical_first_resize_is_refused():
    with pytest.raises(ValueError, match="vertically first"):
        resize_window(np.zeros((2000, 700, 3), np.uint8), canvas=(700, 2000), size=(448, 1280),
                      window=(0, 416, 448, 448))
