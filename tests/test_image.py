"""Image preprocessing: RGB conversion, square padding, CLIP pixel values, files and videos."""

import io
import json
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hostile import bomb_png, line_png, png_bytes
from PIL import Image

from qscorer.data import (
    ImageProcessor,
    UnreadableImageError,
    expand2square,
    load_image,
    load_video_frames,
    process_images,
    to_rgb,
)
from qscorer.errors import QScorerError
from qscorer.model.constants import CLIP_MEAN, CLIP_STD, IMAGE_BACKGROUND

REPO = Path(__file__).resolve().parents[1]


def _clip_processor(folder):
    """transformers' CLIP processor on its PIL/numpy path (transformers 5 picks a torchvision one when installed)."""
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return processor_class.from_pretrained(str(folder))


def _normalised(rgb):
    return [(value / 255 - mean) / std for value, mean, std in zip(rgb, CLIP_MEAN, CLIP_STD)]


def test_boat_matches_the_golden_pixel_values(parity_images_dir, golden_dir):
    golden = torch.load(golden_dir / "pixel_values_boat.pt")
    ours = process_images([load_image(parity_images_dir / "boat.jpg")])
    assert ours.shape == (1, 3, 448, 448) and ours.dtype == torch.float32
    assert torch.allclose(ours, golden, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["boat.jpg", "landscape_640x360.jpg", "portrait_300x500.png"])
def test_images_match_the_golden_summaries(parity_images_dir, golden_dir, name):
    summary = json.loads((golden_dir / "pixels.json").read_text())[name]["rgb"]
    values = process_images(load_image(parity_images_dir / name)).double()
    assert list(values.shape) == summary["shape"]
    assert values.mean().item() == pytest.approx(summary["mean"], abs=1e-6)
    assert values.std().item() == pytest.approx(summary["std"], abs=1e-6)
    assert values.sum().item() == pytest.approx(summary["sum"], rel=1e-7)
    assert values.mean(dim=(0, 2, 3)).tolist() == pytest.approx(summary["channel_mean"], abs=1e-6)
    for yx, expected in summary["pixels_yx"].items():
        y, x = map(int, yx.split(","))
        assert values[0, :, y, x].tolist() == pytest.approx(expected, abs=1e-6)


def test_padding_colour(golden_dir):
    expected = json.loads((golden_dir / "pixels.json").read_text())["padding_colour_normalised"]
    assert IMAGE_BACKGROUND == (122, 116, 104)
    values = process_images(Image.new("RGB", (40, 10), (255, 0, 0)))
    assert values[0, :, 0, 0].tolist() == pytest.approx(expected, abs=1e-6)
    assert values[0, :, 224, 224].tolist() == pytest.approx(_normalised((255, 0, 0)), abs=1e-6)


@pytest.mark.parametrize("size", [(448, 448), (449, 450), (640, 360), (300, 500), (1001, 333), (37, 91), (60, 1000),
                                  (1000, 60)])
@pytest.mark.parametrize("aspect", ["pad", "square"])
def test_equals_transformers_clip_processor(parity_dir, size, aspect):
    # 60 x 1000 and 1000 x 60 are resized without their padded square / full-size intermediate (resample.py).
    pixels = np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    reference = _clip_processor(parity_dir / "base")(
        expand2square(image) if aspect == "pad" else image, return_tensors="pt"
    )["pixel_values"]
    assert torch.equal(process_images(image, aspect), reference)


def test_preprocessor_config_holds_the_original_values(parity_dir):
    ours = _clip_processor(REPO / "preprocessor")
    original = _clip_processor(parity_dir / "base")
    keys = ["do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "do_convert_rgb"]
    assert {key: getattr(ours, key) for key in keys} == {key: getattr(original, key) for key in keys}
    assert tuple(ours.image_mean) == CLIP_MEAN and tuple(ours.image_std) == CLIP_STD
    assert ours.size == {"shortest_edge": 448} and ours.crop_size == {"height": 448, "width": 448}


def test_image_processor_checks_saves_and_calls(parity_dir, tmp_path):
    for folder in (parity_dir / "base", parity_dir / "qscorer_merged", REPO / "preprocessor", tmp_path):
        assert ImageProcessor.from_pretrained(folder) == ImageProcessor("pad")
    processor = ImageProcessor.from_pretrained(parity_dir / "base", image_aspect_ratio="square")
    image = Image.new("RGB", (30, 20), (9, 99, 199))
    assert torch.equal(processor([image]), process_images(image, "square"))
    processor.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "preprocessor_config.json").read_text())
    assert saved == json.loads((REPO / "preprocessor" / "preprocessor_config.json").read_text())
    assert _clip_processor(tmp_path / "saved").to_dict() == _clip_processor(REPO / "preprocessor").to_dict()
    other = json.loads((parity_dir / "base" / "preprocessor_config.json").read_text())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "preprocessor_config.json").write_text(json.dumps({**other, "size": 336, "resample": 2}))
    with pytest.raises(QScorerError, match=r"other/preprocessor_config.json asks for .*size 336.*resample 2"):
        ImageProcessor.from_pretrained(tmp_path / "other")


def test_expand2square_centres_the_image():
    wide = expand2square(Image.new("RGB", (4, 2), (255, 0, 0)), (1, 2, 3))
    assert wide.size == (4, 4)
    assert np.asarray(wide)[:, 0].tolist() == [[1, 2, 3], [255, 0, 0], [255, 0, 0], [1, 2, 3]]
    tall = np.asarray(expand2square(Image.new("RGB", (2, 5), (0, 255, 0))))
    assert tall.shape == (5, 5, 3)
    assert tall[0, :, 1].tolist() == [116, 255, 255, 116, 116]  # offset (5 - 2) // 2 = 1, default background
    square = Image.new("RGB", (3, 3))
    assert expand2square(square) is square
    assert expand2square(Image.new("L", (1, 2), 7)).mode == "RGB"


def _save(image, path, **options):
    image.save(path, **options)
    return path


def test_every_mode_becomes_rgb(tmp_path):
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert np.asarray(load_image(_save(rgba, tmp_path / "a.png")))[0, 0].tolist() == [10, 20, 30]  # alpha dropped
    la = Image.new("LA", (2, 2), (90, 0))
    assert np.asarray(load_image(_save(la, tmp_path / "la.png")))[0, 0].tolist() == [90, 90, 90]
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    assert np.asarray(load_image(_save(palette, tmp_path / "p.png", transparency=1)))[0, 0].tolist() == [200, 100, 50]
    grey = Image.new("L", (2, 2), 77)
    assert np.asarray(load_image(_save(grey, tmp_path / "l.png")))[0, 0].tolist() == [77, 77, 77]
    sixteen = Image.fromarray(np.array([[0, 257, 32896, 65535]], dtype=np.uint16))
    loaded = load_image(_save(sixteen, tmp_path / "sixteen.png"))
    assert loaded.mode == "RGB" and np.asarray(loaded)[0, :, 0].tolist() == [0, 1, 128, 255]
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert np.asarray(load_image(_save(cmyk, tmp_path / "c.tif")))[0, 0].tolist() == [255, 0, 0]
    bilevel = Image.new("1", (2, 2), 1)
    assert np.asarray(load_image(_save(bilevel, tmp_path / "b.bmp")))[0, 0].tolist() == [255, 255, 255]


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    assert np.asarray(load_image(path))[0, 0].tolist() == [255, 0, 0]
    with Image.open(path) as opened:
        opened.seek(1)
        assert np.asarray(to_rgb(opened))[0, 0].tolist() == [255, 0, 0]


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(UnreadableImageError, match="image file not found: .*missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(UnreadableImageError, match="cannot read image .*text.jpg"):
        load_image(tmp_path / "text.jpg")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "whole.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:300])
    with pytest.raises(UnreadableImageError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")
    assert issubclass(UnreadableImageError, QScorerError)


def test_decompression_bombs_are_refused_per_image(tmp_path, monkeypatch):
    (tmp_path / "bomb.png").write_bytes(bomb_png())  # 48 KB, 20000 x 20000: PIL raises DecompressionBombError
    with pytest.raises(UnreadableImageError, match=r"bomb.png is refused as a possible decompression bomb"):
        load_image(tmp_path / "bomb.png")
    # 10000 x 10000 = 1e8 pixels: above PIL's limit (89478485) but below twice it, where PIL only warns.
    (tmp_path / "large.png").write_bytes(png_bytes(10000, 10000, bit_depth=1, rows=b""))
    filters = list(warnings.filters)
    with pytest.warns(Image.DecompressionBombWarning):
        with pytest.raises(UnreadableImageError, match=r"large.png has 10000 x 10000 = 100000000 pixels, more than "
                           r"PIL's decompression-bomb limit PIL.Image.MAX_IMAGE_PIXELS = 89478485"):
            load_image(tmp_path / "large.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a process that turns warnings into errors gets the same per-image error
        with pytest.raises(UnreadableImageError, match="large.png is refused as a possible decompression bomb"):
            load_image(tmp_path / "large.png")
    assert warnings.filters == filters and Image.MAX_IMAGE_PIXELS == 89478485  # global state untouched
    Image.new("RGB", (20, 20)).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 399)  # the user's limit is the one that applies
    refused = "20 x 20 = 400 pixels, more than .* = 399"
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(UnreadableImageError, match=refused):
        load_image(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert load_image(tmp_path / "small.png").size == (20, 20)


def test_any_decoding_failure_is_an_unreadable_image(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    assert load_image(io.BytesIO(data), name="upload #3").size == (64, 64)
    with pytest.raises(UnreadableImageError, match=r"^cannot read image upload #3: not a recognised image format$"):
        load_image(io.BytesIO(b""), name="upload #3")
    with pytest.raises(UnreadableImageError, match=r"cannot read image .*folder: IsADirectoryError"):
        load_image(tmp_path.joinpath("folder").mkdir() or tmp_path / "folder")

    def struct_error(*args, **kwargs):
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(Image, "open", struct_error)  # decoders raise more than OSError on hostile files
    with pytest.raises(UnreadableImageError, match=r"whole.png: error: unpack requires a buffer of 4 bytes"):
        load_image(tmp_path / "whole.png")


def test_in_memory_images_that_cannot_be_used(tmp_path):
    with pytest.raises(UnreadableImageError, match="cannot use an empty RGB image of 0 x 5 pixels"):
        process_images(Image.new("RGB", (0, 5)))
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    with Image.open(tmp_path / "cut.png") as lazy:  # opened, not decoded: decoding fails inside process_images
        with pytest.raises(UnreadableImageError, match="cannot read a RGB image of 64 x 64 pixels: OSError"):
            process_images(lazy)


def test_extreme_shapes_are_padded_without_the_square(tmp_path):
    # 1 x 100000: the original pads to a 100000 x 100000 square (40 GB in PIL) and resizes it to 448: one column in
    # a filter window 900 pixels wide moves no output pixel by more than one grey level. Here the same pixels come
    # from the column alone (bit-exactness against PIL's canvas is in test_resample.py, on smaller canvases).
    (tmp_path / "column.png").write_bytes(line_png(1, 100000))
    values = process_images(load_image(tmp_path / "column.png"))[0].double()
    background = torch.tensor(_normalised(IMAGE_BACKGROUND), dtype=torch.float64)[:, None, None]
    one_level = 1 / 255 / torch.tensor(CLIP_STD, dtype=torch.float64)[:, None, None]
    assert values.shape == (3, 448, 448) and ((values - background).abs() <= one_level + 1e-6).all()


def test_process_images_batches_and_validates():
    batch = process_images([Image.new("RGB", (10, 20)), Image.new("L", (30, 5))])
    assert batch.shape == (2, 3, 448, 448) and batch.dtype == torch.float32
    with pytest.raises(QScorerError, match="image_aspect_ratio 'resize'"):
        process_images(Image.new("RGB", (2, 2)), "resize")
    with pytest.raises(QScorerError, match="at least one image"):
        process_images([])


def test_square_mode_crops_the_long_side():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 40, 100))  # a white band on the left fifth, cut off by the centre crop
    values = process_images(image, "square")
    assert values[0, :, 224, 0].tolist() == pytest.approx(_normalised((0, 0, 0)), abs=1e-6)


def _write_video(path, colours, fps):
    av = pytest.importorskip("av")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.options = {"qscale": "1"}
        for colour in colours:
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), colour, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_video_is_sampled_at_one_frame_per_second(tmp_path):
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0), (0, 250, 250)]
    _write_video(tmp_path / "clip.mp4", colours, fps=2)
    frames = load_video_frames(tmp_path / "clip.mp4")
    # 5 frames at 2 fps: int(5 / 2) = 2 samples, at frames int(2 * 0) = 0 and int(2 * 1) = 2.
    assert [frame.mode for frame in frames] == ["RGB", "RGB"]
    for frame, expected in zip(frames, [colours[0], colours[2]]):
        assert np.abs(np.asarray(frame)[16, 16].astype(int) - expected).max() <= 12


def test_video_shorter_than_a_second(tmp_path):
    _write_video(tmp_path / "short.mp4", [(0, 0, 0)], fps=4)
    with pytest.raises(UnreadableImageError, match="short.mp4 is shorter than one second"):
        load_video_frames(tmp_path / "short.mp4")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(UnreadableImageError, match="cannot read video .*broken.mp4"):
        load_video_frames(tmp_path / "broken.mp4")
    with pytest.raises(UnreadableImageError, match="missing.mp4"):
        load_video_frames(tmp_path / "missing.mp4")


def test_missing_pyav_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(QScorerError, match=r"clip.mp4 needs PyAV.*qscorer\[video\]"):
        load_video_frames(tmp_path / "clip.mp4")
