"""Model core: state-dict layout, checkpoint loading, golden forward parity, KV cache, checkpointing, losses."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from tiny import SCORE_IDS, tiny_config, tiny_model

from qscorer.model import MPLUGOwl2Config, MPLUGOwl2LlamaForCausalLM
from qscorer.model.abstractor import sincos_1d, sincos_2d_with_cls
from qscorer.model.head import DeepMLP
from qscorer.model.llama import MPLUGOwl2RMSNorm, MultiwayNetwork, rotate_half
from qscorer.model.vision import QuickGELU

TOLERANCE = 1e-5


def facts_manifest_7b() -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of the 7B model with the 5 score tokens, written out by hand from the original's."""
    width, inner, vocab = 4096, 11008, 32005
    manifest = {
        "model.embed_tokens.weight": (vocab, width),
        "model.norm.weight": (width,),
        "lm_head.weight": (vocab, width),
    }
    for i in range(32):
        layer = f"model.layers.{i}."
        manifest[layer + "self_attn.q_proj.weight"] = (width, width)
        manifest[layer + "self_attn.o_proj.weight"] = (width, width)
        manifest[layer + "mlp.gate_proj.weight"] = (inner, width)
        manifest[layer + "mlp.up_proj.weight"] = (inner, width)
        manifest[layer + "mlp.down_proj.weight"] = (width, inner)
        for branch in (0, 1):
            manifest[layer + f"self_attn.k_proj.multiway.{branch}.weight"] = (width, width)
            manifest[layer + f"self_attn.v_proj.multiway.{branch}.weight"] = (width, width)
            manifest[layer + f"input_layernorm.multiway.{branch}.weight"] = (width,)
            manifest[layer + f"post_attention_layernorm.multiway.{branch}.weight"] = (width,)

    vision = "model.vision_model."
    manifest[vision + "embeddings.cls_token"] = (1, 1, 1024)
    manifest[vision + "embeddings.patch_embed.weight"] = (1024, 3, 14, 14)
    manifest[vision + "embeddings.position_embedding"] = (1, 1025, 1024)
    for suffix in ("weight", "bias"):
        manifest[vision + f"embeddings.pre_layernorm.{suffix}"] = (1024,)
        manifest[vision + f"post_layernorm.{suffix}"] = (1024,)
    for j in range(24):
        layer = vision + f"encoder.layers.{j}."
        for name, weight_shape in {
            "input_layernorm": (1024,),
            "self_attn.query_key_value": (3072, 1024),
            "self_attn.dense": (1024, 1024),
            "post_attention_layernorm": (1024,),
            "mlp.fc1": (4096, 1024),
            "mlp.fc2": (1024, 4096),
        }.items():
            manifest[layer + name + ".weight"] = weight_shape
            manifest[layer + name + ".bias"] = (weight_shape[0],)

    abstractor = "model.visual_abstractor."
    manifest[abstractor + "query_embeds"] = (1, 64, 1024)
    manifest[abstractor + "visual_fc.weight"] = (4096, 1024)
    manifest[abstractor + "visual_fc.bias"] = (4096,)
    manifest[abstractor + "vit_eos"] = (1, 1, 4096)
    for k in range(6):
        block = abstractor + f"encoder.layers.{k}.crossattention."
        for name, weight_shape in {
            "norm1": (1024,),
            "normk": (1024,),
            "attention.query": (1024, 1024),
            "attention.key": (1024, 1024),
            "attention.value": (1024, 1024),
            "output.out_proj": (1024, 1024),
            "output.norm2": (1024,),
            "output.mlp.w1": (2816, 1024),
            "output.mlp.w2": (1024, 2816),
            "output.mlp.w3": (2816, 1024),
            "output.mlp.ffn_ln": (2816,),
        }.items():
            manifest[block + name + ".weight"] = weight_shape
            manifest[block + name + ".bias"] = (weight_shape[0],)
        manifest[block + "attention.q_pos_embed"] = (64, 1024)
        manifest[block + "attention.k_pos_embed"] = (1025, 1024)

    manifest["deepmlp.model.0.linear.weight"] = (2048, 4096)
    manifest["deepmlp.model.0.linear.bias"] = (2048,)
    manifest["deepmlp.model.1.linear.weight"] = (1024, 2048)
    manifest["deepmlp.model.1.linear.bias"] = (1024,)
    manifest["deepmlp.output_layer.weight"] = (1, 1024)
    manifest["deepmlp.output_layer.bias"] = (1,)
    return manifest


def test_7b_state_dict_matches_facts_manifest():
    with torch.device("meta"):
        model = MPLUGOwl2LlamaForCausalLM(MPLUGOwl2Config(vocab_size=32005))
    actual = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    expected = facts_manifest_7b()
    assert sorted(set(actual) - set(expected)) == []
    assert sorted(set(expected) - set(actual)) == []
    assert actual == expected
    assert sum(key.endswith("_pos_embed") for key in actual) == 12
    assert sum(parameter.numel() for parameter in model.parameters()) == 8_208_390_145


def test_config_defaults_are_the_7b_model_and_round_trip(tmp_path):
    config = MPLUGOwl2Config()
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (4096, 32, 32000)
    assert config.vision_config.image_size == 448 and config.abstractor_config.grid_size == 32
    assert config.deepmlp_hidden_dims == [2048, 1024] and config.score_token_id == []

    config = tiny_config()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "mplug_owl2"
    assert saved["rope_scaling"] is None and saved["rope_theta"] == 10000.0
    assert saved["score_token_id"] == [32004, 32003, 32002, 32001, 32000]
    assert saved["score_tokens"] == ["<score1>", "<score2>", "<score3>", "<score4>", "<score5>"]
    assert saved["deepmlp_hidden_dims"] == [64, 32]
    assert set(saved["visual_config"]) == {"visual_model", "visual_abstractor"}
    reloaded = MPLUGOwl2Config.from_pretrained(tmp_path)
    assert reloaded.vision_config.hidden_size == 32 and reloaded.abstractor_config.intermediate_size == 88


def test_unsupported_rope_scaling_is_rejected():
    with pytest.raises(ValueError, match="rope_scaling"):
        MPLUGOwl2Config(rope_scaling={"type": "linear", "factor": 2.0})


def test_base_checkpoint_loads_without_unexpected_keys(parity_dir):
    original = torch.load(parity_dir / "base" / "pytorch_model.bin", weights_only=True)
    assert any(key.endswith("rotary_emb.inv_freq") for key in original)
    model, info = MPLUGOwl2LlamaForCausalLM.from_pretrained(parity_dir / "base", output_loading_info=True)
    assert info["unexpected_keys"] == [] or info["unexpected_keys"] == set()
    assert sorted(info["missing_keys"]) == sorted(key for key in model.state_dict() if key.startswith("deepmlp."))
    assert model.config.vocab_size == 32000


def test_base_checkpoint_without_sincos_buffers_recomputes_them(parity_dir, tmp_path):
    original = torch.load(parity_dir / "base" / "pytorch_model.bin", weights_only=True)
    stripped = {key: value for key, value in original.items() if not key.endswith("_pos_embed")}
    assert len(original) - len(stripped) == 4
    shutil.copy(parity_dir / "base" / "config.json", tmp_path / "config.json")
    torch.save(stripped, tmp_path / "pytorch_model.bin")
    model, info = MPLUGOwl2LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"]
    assert not [key for key in info["missing_keys"] if "pos_embed" in key]
    state = model.state_dict()
    for key, value in original.items():
        if key.endswith("_pos_embed"):
            torch.testing.assert_close(state[key], value, atol=1e-6, rtol=0)


def test_sincos_tables_match_the_reference_values():
    keys = sincos_2d_with_cls(1024, 32)
    assert keys.shape == (1025, 1024) and keys.dtype == torch.float32
    assert torch.all(keys[0] == 0)
    torch.testing.assert_close(keys[2, :3], torch.tensor([0.841471, 0.821856, 0.801962]), atol=1e-6, rtol=0)
    assert torch.all(keys[2, 512:515] == 0)
    torch.testing.assert_close(keys[33, 512:], keys[2, :512])
    queries = sincos_1d(1024, 64)
    omega_1 = 1 / 10000 ** (1 / 512)
    assert queries[3, 1].item() == pytest.approx(math.sin(3 * omega_1), abs=1e-7)
    assert queries[3, 513].item() == pytest.approx(math.cos(3 * omega_1), abs=1e-7)


@pytest.fixture(scope="module")
def merged_model(parity_dir):
    return MPLUGOwl2LlamaForCausalLM.from_pretrained(parity_dir / "qscorer_merged", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def boat(golden_dir):
    tokens = json.loads((golden_dir / "tokens.json").read_text())
    intermediates = json.loads((golden_dir / "intermediates_boat.json").read_text())
    pixels = torch.load(golden_dir / "pixel_values_boat.pt", weights_only=True)
    return tokens["scorer_prompt_ids"], pixels, intermediates


def _assert_matches_intermediates(hidden_row, last_logits, intermediates):
    expected_hidden = torch.tensor(intermediates["step0_last_layer_hidden"]["values"])
    assert (hidden_row - expected_hidden).abs().max().item() < TOLERANCE
    top = last_logits.topk(10)
    assert top.indices.tolist() == intermediates["step0_logits_last_top10"]["ids"]
    expected_top = torch.tensor(intermediates["step0_logits_last_top10"]["values"])
    assert (top.values - expected_top).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_golden_intermediates_single_image(merged_model, boat, implementation):
    prompt_ids, pixels, intermediates = boat
    merged_model.config._attn_implementation = implementation
    with torch.no_grad():
        visual = merged_model.model.encode_images(pixels)
        output = merged_model(input_ids=torch.tensor([prompt_ids]), images=pixels)
    expected_visual = torch.tensor(intermediates["abstractor_output"]["values"])
    assert visual.shape == (1, 65, 64)
    assert (visual[0] - expected_visual).abs().max().item() < TOLERANCE
    assert output.last_hidden_state.shape == (1, 92, 64)
    _assert_matches_intermediates(output.last_hidden_state[0], output.logits[0, -1], intermediates)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_golden_intermediates_in_a_right_padded_batch(merged_model, boat, implementation):
    prompt_ids, pixels, intermediates = boat
    longer = prompt_ids[:16] + [450, 11029, 310, 278] * 6 + prompt_ids[16:]
    input_ids = torch.zeros(2, len(longer), dtype=torch.long)
    attention_mask = torch.zeros(2, len(longer), dtype=torch.bool)
    input_ids[0, : len(prompt_ids)] = torch.tensor(prompt_ids)
    attention_mask[0, : len(prompt_ids)] = True
    input_ids[1], attention_mask[1] = torch.tensor(longer), True
    merged_model.config._attn_implementation = implementation
    with torch.no_grad():
        output = merged_model(input_ids=input_ids, attention_mask=attention_mask, images=torch.cat([pixels, pixels]))
    assert output.attention_mask[0].sum().item() == 92 and output.attention_mask[1].all()
    _assert_matches_intermediates(output.last_hidden_state[0, :92], output.logits[0, 91], intermediates)


def test_eager_is_selectable_through_from_pretrained(parity_dir):
    model = MPLUGOwl2LlamaForCausalLM.from_pretrained(parity_dir / "qscorer_merged", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_kv_cached_step_equals_full_recompute(implementation):
    model = tiny_model(seed=1)
    model.config._attn_implementation = implementation
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, 448, 448)
    prompt = torch.tensor([[1, 3148, 1001, 29901, -200, 29871, 13, 450, 1967, 338]] * 2)
    next_tokens = torch.tensor([[29871], [450]])
    with torch.no_grad():
        full = model(input_ids=torch.cat([prompt, next_tokens], dim=1), images=pixels)
        prefill = model(input_ids=prompt, images=pixels, use_cache=True)
        step = model(input_ids=next_tokens, past_key_values=prefill.cache)
    assert len(prefill.cache) == 2 and prefill.cache[0][0].shape == (2, 4, 9 + 65, 16)
    assert (step.last_hidden_state[:, -1] - full.last_hidden_state[:, -1]).abs().max().item() <= TOLERANCE
    assert (step.logits[:, -1] - full.logits[:, -1]).abs().max().item() <= TOLERANCE


def _training_batch(seed: int = 3):
    torch.manual_seed(seed)
    input_ids = torch.tensor(
        [
            [1, 3148, 29901, 29871, -200, 29871, 13, 450, 338, 29871, 32003, 29889, 2],
            [1, 3148, 29901, 29871, -200, 29871, 13, 450, 338, 29871, 32000, 29889, 2],
        ]
    )
    labels = input_ids.clone()
    labels[:, :7] = -100
    return {
        "input_ids": input_ids,
        "labels": labels,
        "images": torch.randn(2, 1, 3, 448, 448),
        "gt_scores": torch.tensor([3.7, 1.2]),
    }


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    batch = _training_batch()
    gradients = []
    for checkpointing in (False, True):
        model = tiny_model(seed=4).train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
            enable({"use_reentrant": reentrant})
            model.enable_input_require_grads()
            assert model.model.gradient_checkpointing and model.model.vision_model.encoder.gradient_checkpointing
        model(**batch).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, atol=1e-5, rtol=1e-4, msg=name)


def test_loss_is_cross_entropy_plus_summed_squared_error_over_batch():
    model = tiny_model(seed=5)
    batch = _training_batch()
    with torch.no_grad():
        output = model(**batch)
        plain = model(input_ids=batch["input_ids"], images=batch["images"])
    logits, hidden = plain.logits, plain.last_hidden_state
    spliced_labels = torch.full(logits.shape[:2], -100)
    spliced_labels[:, 4 + 65 + 2 :] = batch["labels"][:, 7:]
    log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    targets = spliced_labels[:, 1:]
    picked = [log_probs[b, t, targets[b, t]] for b in range(2) for t in range(targets.shape[1]) if targets[b, t] >= 0]
    expected_ce = -sum(picked) / len(picked)
    score_position = 4 + 65 + 4  # the "▁" that precedes <scoreN> in spliced coordinates
    predictions = model.deepmlp(hidden[:, score_position]).clamp(0, 5)
    expected_score = ((predictions - batch["gt_scores"]) ** 2).sum() / 2
    assert output.score_positions.tolist() == [[0, score_position], [1, score_position]]
    assert torch.equal(output.labels, spliced_labels)
    assert output.loss_ce.item() == pytest.approx(expected_ce.item(), abs=1e-5)
    assert output.loss_score.item() == pytest.approx(expected_score.item(), abs=1e-5)
    assert output.loss.item() == pytest.approx(expected_ce.item() + expected_score.item(), abs=1e-5)
    assert {"loss", "loss_ce", "loss_score", "score_positions", "score_predictions"} <= set(output.keys())
    with torch.no_grad():
        as_tuple = model(**batch, return_dict=False)
    assert as_tuple[0].item() == pytest.approx(output.loss.item(), abs=1e-6)


def test_prediction_is_clamped_to_zero_five_in_the_loss():
    model = tiny_model(seed=6)
    with torch.no_grad():
        model.deepmlp.output_layer.bias.fill_(100.0)
        output = model(**_training_batch())
    assert output.score_predictions.tolist() == [5.0, 5.0]
    assert output.loss_score.item() == pytest.approx(((5 - 3.7) ** 2 + (5 - 1.2) ** 2) / 2, abs=1e-5)


def test_task_type_dispatcher_weights_each_subset():
    model = tiny_model(seed=7)
    model.config.weight_desp, model.config.weight_next_token = 1.0, 0.05
    batch = _training_batch()
    with torch.no_grad():
        dispatched = model(input_type="single", task_types=["score", "description"], **batch)
        score_part = model(**{key: value[:1] for key, value in batch.items()}).loss
        description_part = model(**{key: value[1:] for key, value in batch.items()}).loss
        only_score = model(input_type="single", task_types=["score", "score"], **batch)
        whole = model(**batch).loss
    assert dispatched.loss.item() == pytest.approx(1.0 * description_part.item() + 0.05 * score_part.item(), abs=1e-6)
    assert dispatched.loss_score.item() == pytest.approx(score_part.item(), abs=1e-6)
    assert only_score.loss.item() == pytest.approx(0.05 * whole.item(), abs=1e-6)
    assert only_score.loss_description is None
    with pytest.raises(ValueError, match="unknown task_types"):
        model(input_type="single", task_types=["score", "caption"], **batch)
    with pytest.raises(ValueError, match="input_type"):
        model(input_type="pairwise", **batch)


def test_add_score_tokens_grows_embeddings_with_mean_rows():
    model = tiny_model(seed=8, vocab_size=32000, score_token_id=[], score_tokens=[])
    old_head = model.lm_head.weight.detach().clone()
    old_embed = model.get_input_embeddings().weight.detach().clone()
    model.add_score_tokens(SCORE_IDS, [f"<score{level}>" for level in range(1, 6)])
    assert model.config.vocab_size == 32005 and model.lm_head.weight.shape == (32005, 64)
    assert model.config.score_token_id == [32004, 32003, 32002, 32001, 32000]
    assert model.config.score_tokens == ["<score1>", "<score2>", "<score3>", "<score4>", "<score5>"]
    torch.testing.assert_close(model.lm_head.weight[:32000], old_head)
    for row in range(32000, 32005):
        torch.testing.assert_close(model.lm_head.weight[row], old_head.mean(0))
        torch.testing.assert_close(model.get_input_embeddings().weight[row], old_embed.mean(0))


def test_deepmlp_layout_residual_and_value():
    head = DeepMLP(64, [64, 32])
    assert [block.residual for block in head.model] == [True, False]
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    first = torch.relu(head.model[0].linear(x)) + x
    second = torch.relu(head.model[1].linear(first))
    torch.testing.assert_close(head(x), head.output_layer(second).squeeze(-1))
    assert DeepMLP(4096, [2048, 1024]).model[0].residual is False


def test_building_blocks_follow_the_reference_formulas():
    x = torch.tensor([[-2.0, 0.0, 1.5]])
    torch.testing.assert_close(QuickGELU()(x), x * torch.sigmoid(1.702 * x))
    torch.testing.assert_close(rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([-3.0, -4.0, 1.0, 2.0]))
    norm = MPLUGOwl2RMSNorm(3, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
    rms = math.sqrt((4 + 0 + 2.25) / 3 + 1e-6)
    torch.testing.assert_close(norm(x), torch.tensor([[-2 / rms, 0.0, 3 * 1.5 / rms]]))
    assert norm(x.to(torch.bfloat16)).dtype == torch.float32  # fp32 weight times bf16 normalised input

    routed = MultiwayNetwork(lambda: torch.nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        routed.multiway[0].weight.fill_(1.0)
        routed.multiway[1].weight.fill_(-1.0)
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    out = routed(hidden, torch.tensor([[0, 1, 0]]))
    assert out.flatten().tolist() == [3.0, -7.0, 11.0]


def test_text_only_forward_and_bad_image_counts():
    model = tiny_model(seed=9)
    with torch.no_grad():
        text = model(input_ids=torch.tensor([[1, 450, 1967]]))
    assert text.logits.shape == (1, 3, 32005)
    with pytest.raises(ValueError, match="no images"):
        model(input_ids=torch.tensor([[1, -200, 450]]))
    with pytest.raises(ValueError, match="3 images for 1 image placeholders"):
        model(input_ids=torch.tensor([[1, -200, 450]]), images=torch.zeros(3, 3, 448, 448))


def test_model_code_does_not_touch_transformers_llama():
    code = (
        "import sys, qscorer.model, transformers;"
        "print(any(name.startswith('transformers.models.llama') for name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_splice_places_rows_like_concatenation():
    from qscorer.model.modeling import splice_image_features

    torch.manual_seed(0)
    ids = torch.tensor([[5, -200, 6, -200, 7], [8, 9, -200, 10, 0], [11, 12, 13, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, 6, -100, 7], [-100, -100, -100, 10, -100], [-100, 12, 13, -100, -100]])
    text = torch.randn(3, 5, 4)
    features = torch.randn(4, 2, 4)  # three placeholders, plus the image the text-only row takes and ignores
    spliced = splice_image_features(ids, text, features, labels, mask)
    image_of = {(0, 1): 0, (0, 3): 1, (1, 2): 2}
    for row in range(3):
        embeds, indicators, row_labels, row_mask = [], [], [], []
        for column in range(5):
            if (row, column) in image_of:
                embeds += list(features[image_of[row, column]])
                indicators += [1, 1]
                row_labels += [-100, -100]
                row_mask += [True, True]
            else:
                embeds.append(text[row, column])
                indicators.append(0)
                row_labels.append(int(labels[row, column]))
                row_mask.append(bool(mask[row, column]))
        padding = 7 - len(embeds)
        torch.testing.assert_close(spliced.inputs_embeds[row], torch.stack(embeds + [torch.zeros(4)] * padding))
        assert spliced.modality_indicators[row].tolist() == indicators + [0] * padding
        assert spliced.labels[row].tolist() == row_labels + [-100] * padding
        assert spliced.attention_mask[row].tolist() == row_mask + [False] * padding
    unmasked = splice_image_features(ids[:2], text[:2], features[:3], None, None)
    assert unmasked.attention_mask.tolist() == [[True] * 7, [True] * 6 + [False]]
    with pytest.raises(ValueError, match="5 images for 3 image placeholders"):
        splice_image_features(ids, text, torch.randn(5, 2, 4), None, None)
