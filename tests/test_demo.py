"""``qscorer demo`` end to end at a small size: every step runs through the CLI and the outputs are consistent."""

import json

import numpy as np
import pytest
import torch

from qscorer.cli import main
from qscorer.demo import tiny_config
from qscorer.demo_base import (
    DEMO_PHOTOS,
    SHIPPED_BASE,
    _power_law_texture,
    dead_leaves,
    pretrain_demo_base,
    transplant_encoder,
)
from qscorer.errors import QScorerError


def test_demo_runs_the_pipeline_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    status = main(["demo", "--out", str(out), "--num-train", "16", "--num-test", "8", "--epochs", "1"])
    assert status == 0
    summary = json.loads((out / "demo.json").read_text())
    assert summary["metrics"]["n"] == 8 and set(summary["seconds"]) == {"synth", "train", "infer", "eval"}
    assert summary["prompt"] == "training" and summary["base"] == str(SHIPPED_BASE)
    dataset = json.loads((out / "data" / "dataset.json").read_text())
    assert sorted(dataset["source_photos"]) == sorted(DEMO_PHOTOS) and dataset["image_size"] == 112
    predictions = [json.loads(line) for line in (out / "results" / "test.json").read_text().splitlines()]
    assert len(predictions) == 8 and all("score" in record for record in predictions)
    assert (out / "results" / "plots" / "test.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "TINY model" in printed and "says nothing about Q-Scorer's accuracy" in printed

    (out / "results" / "stale.txt").write_text("previous run")
    assert main(["demo", "--out", str(out), "--num-train", "16", "--num-test", "8", "--epochs", "1"]) == 0
    assert not (out / "results" / "stale.txt").exists()


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not a previous demo output" in capsys.readouterr().err and (tmp_path / "mine.txt").exists()


def test_demo_refuses_a_base_that_is_not_a_model_folder_before_any_step(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "out"), "--base", str(tmp_path / "missing")]) == 2
    assert "is not a model folder (no config.json)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tiny_config_scales_the_init_with_the_width():
    config = tiny_config(512)
    assert config.initializer_range == 64**-0.5 and config.vision_config.patch_size == 32
    assert config.abstractor_config.grid_size == 14 and config.vision_config.image_size == 448


def test_dead_leaves_are_seeded_images_with_edges_at_many_scales():
    first, again = (dead_leaves(112, np.random.default_rng(3)) for _ in range(2))
    other = dead_leaves(112, np.random.default_rng(4))
    assert first.shape == (112, 112, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    grey = first.astype(float).mean(axis=2)
    steps = np.abs(np.diff(grey, axis=1))
    assert (steps > 20).mean() > 0.1 and (steps < 2).mean() > 0.1  # sharp edges and smooth surfaces
    assert len(np.unique(first.reshape(-1, 3), axis=0)) > 1000  # many leaves, textures, anti-aliased edges



@pytest.mark.parametrize("option", ["num_photo_images", "num_dead_leaves", "steps"])
def test_pretraining_refuses_an_empty_count_before_any_work(tmp_path, option):
    with pytest.raises(QScorerError, match=f"{option} must be at least 1, got 0"):
        pretrain_demo_base(tmp_path / "base", tmp_path / "work", **{option: 0})
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("exponent", [1.0, 2.0, 3.0])
def test_leaf_textures_have_unit_std_and_a_power_law_spectrum(exponent):
    texture = _power_law_texture(256, exponent, np.random.default_rng(0))
    assert texture.std() == pytest.approx(1.0) and abs(texture.mean()) < 1e-9
    power = np.abs(np.fft.rfft2(texture)) ** 2
    frequency = np.hypot(np.fft.fftfreq(256)[:, None], np.fft.rfftfreq(256)[None, :])
    band = (frequency > 0.02) & (frequency < 0.4)
    slope = np.polyfit(np.log(frequency[band]), np.log(power[band]), 1)[0]
    assert slope == pytest.approx(-exponent, abs=0.1)


def test_shipped_base_is_a_small_base_without_score_tokens():
    config = json.loads((SHIPPED_BASE / "config.json").read_text())
    assert config["score_token_id"] == [] and config["visual_config"]["visual_model"]["patch_size"] == 32
    assert (SHIPPED_BASE / "model.safetensors").stat().st_size < 5_000_000


def test_transplanted_encoder_sees_an_upsampled_image_as_the_pretrained_one_sees_the_image():
    """The 448-px encoder on a 4x nearest-upsampled 112-px image gives the 112-px encoder's features; on the model's
    own preprocessing of a 112-px image, those of the 112-px encoder on the pretraining view of it."""
    from PIL import Image

    from qscorer.demo_base import _model_view
    from qscorer.model import MPLUGOwl2LlamaForCausalLM
    from qscorer.model.configuration import MplugOwlVisionConfig
    from qscorer.model.image_processing import process_images
    from qscorer.model.vision import MplugOwlVisionModel

    class Attention:
        _attn_implementation = "sdpa"

    torch.manual_seed(0)
    small = MplugOwlVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=112, patch_size=8)
    encoder = MplugOwlVisionModel(small, Attention()).eval()
    for parameter in encoder.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    model = MPLUGOwl2LlamaForCausalLM(tiny_config(512)).eval()
    transplant_encoder(model, encoder)
    image = torch.randn(2, 3, 112, 112)
    upsampled = image.repeat_interleave(4, 2).repeat_interleave(4, 3)
    with torch.no_grad():
        expected = encoder(image)
        got = model.model.vision_model(upsampled)
    assert got.shape == (2, 197, 64) and torch.allclose(got, expected, atol=1e-4)
    photo = dead_leaves(112, np.random.default_rng(0))
    with torch.no_grad():
        seen = model.model.vision_model(process_images([Image.fromarray(photo)]))
        pretrained_view = encoder(_model_view(photo[None]))
    assert torch.allclose(seen, pretrained_view, atol=1e-4)
    assert model.deepmlp.output_layer.bias.tolist() == pytest.approx([3.0])
