"""Scoring: one prefill + one cached step equals the original two full passes; the Scorer API; ``qscorer score``."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny import save_tiny_checkpoint, tiny_model

from qscorer.cli import main
from qscorer.constants import LONE_SPACE_TOKEN_ID, SCORE_TOKENS_REPORT_ORDER
from qscorer.data import process_images, score_processor
from qscorer.errors import QScorerError
from qscorer.scoring import Scorer, score_with_two_full_passes

REPO = Path(__file__).resolve().parents[1]
IMAGES = ["boat.jpg", "landscape_640x360.jpg", "portrait_300x500.png"]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_one_prefill_plus_cached_step_equals_two_full_passes(implementation):
    model = tiny_model(seed=21)
    model.config._attn_implementation = implementation
    torch.manual_seed(22)
    pixels = torch.randn(4, 3, 448, 448)
    prompt = [1, 3148, 1001, 29901, 1128, 1967, 29973, 13, -200, 29871, 13, 22933, 29901, 450, 1967, 338]
    input_ids = torch.tensor([prompt] * 4)
    with torch.no_grad():
        prediction = model.predict_scores(input_ids, pixels)
    appended, scores, score_logits, hidden = score_with_two_full_passes(model, input_ids, pixels)
    assert prediction.token_ids.tolist() == appended.tolist()
    assert any(token != LONE_SPACE_TOKEN_ID for token in appended.tolist())
    assert (prediction.scores - scores).abs().max().item() <= 1e-5
    assert (prediction.score_token_logits - score_logits).abs().max().item() <= 1e-5
    assert (prediction.hidden - hidden).abs().max().item() <= 1e-5


def test_eval_prompt_reproduces_the_original_batch_evaluation(parity_dir, golden_dir, parity_images_dir):
    golden = [json.loads(line) for line in (golden_dir / "iqa_eval_lora_bs1.jsonl").read_text().splitlines()]
    for batch_size in (1, 3):
        scorer = Scorer(
            parity_dir / "qscorer_lora", parity_dir / "base", device="cpu", dtype="float32", batch_size=batch_size
        )
        assert scorer.prompt == "eval" and scorer.clamp
        results = scorer.score([parity_images_dir / record["image"] for record in golden])
        for result, expected in zip(results, golden, strict=True):
            assert result.score == pytest.approx(expected["score"], abs=1e-5)
            for token in SCORE_TOKENS_REPORT_ORDER:
                assert result.logits[token] == pytest.approx(expected["logits"][token], abs=1e-5)
                assert result.probs[token] == pytest.approx(expected["probs"][token], abs=1e-9, rel=1e-4)


@pytest.fixture(scope="module")
def tiny_scorer_folder(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_scorer"), seed=23)


@pytest.fixture(scope="module")
def images_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    torch.manual_seed(0)
    for index, size in enumerate([(64, 48), (50, 90), (70, 70)]):
        pixels = (torch.rand(size[1], size[0], 3) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"photo_{index}.png")
    return folder


def test_paths_pil_images_and_tensors_score_the_same(tiny_scorer_folder, images_folder):
    scorer = Scorer(tiny_scorer_folder, device="cpu", dtype="float32", clamp=False, batch_size=2)
    paths = sorted(images_folder.glob("*.png"))
    images = [Image.open(path) for path in paths]
    by_path = scorer(paths)
    assert all(isinstance(score, float) for score in by_path)
    assert scorer(images) == pytest.approx(by_path, abs=1e-6)
    assert scorer(process_images(images)) == pytest.approx(by_path, abs=1e-6)
    assert scorer(paths[0]) == pytest.approx(by_path[:1], abs=1e-6)
    clamped = Scorer.from_model(scorer.model, scorer.tokenizer, clamp=True)
    assert clamped(paths) == pytest.approx([min(max(score, 0.0), 5.0) for score in by_path], abs=1e-6)
    scorer_prompt = Scorer.from_model(scorer.model, scorer.tokenizer, prompt="scorer")
    assert scorer_prompt.prompt_ids.tolist() != scorer.prompt_ids.tolist()


def test_score_tensor_keeps_the_graph_to_the_pixels(tiny_scorer_folder, images_folder):
    scorer = Scorer(tiny_scorer_folder, device="cpu", dtype="float32", clamp=False)
    pixels = process_images([Image.open(path) for path in sorted(images_folder.glob("*.png"))]).requires_grad_(True)
    scores = scorer.score_tensor(pixels)
    assert scores.shape == (3,) and scores.requires_grad
    scores.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum().item() > 0
    assert scores.detach() == pytest.approx(torch.tensor(scorer(pixels.detach())), abs=1e-5)


def test_model_score_method_matches_the_scorer(tiny_scorer_folder, images_folder):
    scorer = Scorer(tiny_scorer_folder, device="cpu", dtype="float32")
    images = [Image.open(path) for path in sorted(images_folder.glob("*.png"))]
    processor = score_processor(scorer.tokenizer)
    assert scorer.model.score(images, processor) == pytest.approx(scorer(images), abs=1e-6)
    assert scorer.model.score(images[0], processor, prompt="scorer") == pytest.approx(
        Scorer.from_model(scorer.model, scorer.tokenizer, prompt="scorer")(images[:1]), abs=1e-6
    )
    with pytest.raises(QScorerError, match=r"score_prompts\.json is absent .*score_processor\(tokenizer\)"):
        scorer.model.score(images)


def test_cli_formats_folders_globs_and_unreadable_images(tiny_scorer_folder, images_folder, capsys):
    (images_folder / "broken.jpg").write_bytes(b"not an image")
    common = ["score", "--model-path", str(tiny_scorer_folder), "--device", "cpu", "--dtype", "float32"]
    try:
        status = main([*common, str(images_folder / "photo_0.png"), str(images_folder / "broken.jpg")])
        captured = capsys.readouterr()
        assert status == 2
        lines = captured.out.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{images_folder / 'photo_0.png'}\t")
        errors = [line for line in captured.err.splitlines() if line.startswith("qscorer score: error:")]
        assert len(errors) == 1 and "broken.jpg" in errors[0]

        assert main([*common, "--format", "json", str(images_folder / "*.png")]) == 0
        records = json.loads(capsys.readouterr().out)
        assert [Path(record["image"]).name for record in records] == ["photo_0.png", "photo_1.png", "photo_2.png"]
        assert set(records[0]) == {"image", "score", "logits", "token_id"}
        assert list(records[0]["logits"]) == list(SCORE_TOKENS_REPORT_ORDER)
        text_score = float(lines[0].split("\t")[1])
        assert records[0]["score"] == text_score

        assert (
            main([*common, "--format", "csv", "--batch-size", "2", "--img_path", str(images_folder / "photo_1.png")])
            == 0
        )
        rows = capsys.readouterr().out.splitlines()
        assert rows[0] == "image,score,<score5>,<score4>,<score3>,<score2>,<score1>,token_id" and len(rows) == 2
    finally:
        (images_folder / "broken.jpg").unlink()

    assert main([*common, str(images_folder)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main([*common, str(images_folder / "*.jpeg")]) == 2
    assert "no files match" in capsys.readouterr().err


def test_scorer_py_takes_the_original_flags(tiny_scorer_folder, images_folder):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scorer.py"),
            "--model-path",
            str(tiny_scorer_folder),
            "--device",
            "cpu",
            "--img_path",
            str(images_folder / "photo_0.png"),
            str(images_folder / "photo_1.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
