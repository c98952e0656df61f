"""8-bit and 4-bit loading (bitsandbytes runs both on CPU): what is quantized, how far scores move, errors."""

import json
import sys

import pytest
import torch

from qscorer.errors import QScorerError
from qscorer.scoring import Scorer

pytest.importorskip("bitsandbytes", reason="8/4-bit loading needs the quant extra (pip install 'qscorer[quant]')")

IMAGES = ["boat.jpg", "landscape_640x360.jpg", "portrait_300x500.png"]
LIMITS = {"load_8bit": 0.15, "load_4bit": 0.4}
"""Largest score change allowed against the original's float32 scores, on the tiny random parity model (scale 0..5);
a width-64 random model is far more sensitive to weight rounding than the 7B one."""


@pytest.mark.parametrize("mode", ["load_8bit", "load_4bit"])
def test_quantized_lora_scores_stay_close_to_float32(mode, parity_dir, golden_dir, parity_images_dir):
    import bitsandbytes as bnb

    scorer = Scorer(parity_dir / "qscorer_lora", parity_dir / "base", device="cpu", prompt="scorer", clamp=False,
                    **{mode: True})
    model = scorer.model
    layer = model.model.layers[1]
    expected = bnb.nn.Linear8bitLt if mode == "load_8bit" else bnb.nn.Linear4bit
    for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj.multiway[0], layer.self_attn.v_proj.multiway[1],
                   layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
        assert isinstance(linear, expected)
        assert linear.weight.dtype in (torch.int8, torch.uint8)
    for name in ("lm_head", "deepmlp.output_layer", "model.vision_model.encoder.layers.0.mlp.fc1",
                 "model.visual_abstractor.visual_fc"):
        assert type(model.get_submodule(name)) is torch.nn.Linear
        assert model.get_submodule(name).weight.dtype == torch.bfloat16
    assert model.load_report.quantization == mode.removeprefix("load_")
    golden = json.loads((golden_dir / "scorer_lora.json").read_text())["batch1"]
    for result, name in zip(scorer.score([parity_images_dir / name for name in IMAGES]), IMAGES, strict=True):
        assert abs(result.score - golden[name]["score"]) < LIMITS[mode]


def test_both_modes_or_a_missing_bitsandbytes_are_explained(parity_dir, monkeypatch):
    with pytest.raises(QScorerError, match="not both"):
        Scorer(parity_dir / "qscorer_merged", device="cpu", load_8bit=True, load_4bit=True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(QScorerError, match=r"pip install 'qscorer\[quant\]'"):
        Scorer(parity_dir / "qscorer_merged", device="cpu", load_4bit=True)
