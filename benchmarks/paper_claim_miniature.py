"""The paper's claim in miniature, with seeds: a score token + regression head (Q-Scorer) against level-word answers
scored by their expected level (the Q-Align-style baseline the paper argues against). Prints JSON: held-out SRCC /
PLCC / KRCC / RMSE per arm and seed, and each arm's mean and standard deviation.

    python benchmarks/paper_claim_miniature.py [--seeds 0 1 2] [--work-dir DIR] > miniature.json

Both arms fine-tune the same pretrained base, the one ``qscorer demo`` starts from (``qscorer/assets/demo_base``:
a tiny mPLUG-Owl2 whose vision encoder was pretrained to describe distortions), with the demo's
recipe and budget (``qscorer.demo.training_arguments``: LLM, abstractor, new tokens and head trained, the
pretrained encoder frozen, the same epochs, batch and learning rate), on the demo's data (``qscorer synth``, 112 px,
blur / JPEG / noise / pixelation of six photos), and are scored on its held-out crops, from the photos' corners,
which the base's pretraining never saw:

- ``qscorer``: answers "The quality of the image is <scoreN>."; loss CE + squared error of the head at the position
  predicting the score token; score = the head's output at the token the model appends after "is".
- ``level_words``: answers "The quality of the image is good." (metas/train_levels.json); loss CE only; score =
  sum over the five level words of softmax(their logits after "is") x (1..5).
- ``level_words_soft_labels``: ``level_words`` plus the soft-label terms the project has, read at the level word
  (``--rating_tokens level_words``): DeQA-Score's soft-label KL and in-level loss, weight 1 each. (The ranking loss
  needs pair batches, a different data pipeline and budget; it is not part of this arm.)

Each run is read out after the prompt it was trained at (the training template's prefix, as ``qscorer demo``
scores) and after the original's batch-evaluation prompt. Seeds change the new rows' and the head's
initialisation and the data order; the data are the same for every run. The base's LLM was never trained, so the
level words carry no prior meaning here; this is a smoke-scale illustration on synthetic distortions, not a
reproduction.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from qscorer.cli import main as cli_main
from qscorer.constants import DEFAULT_IMAGE_TOKEN, SCORE_TOKENS
from qscorer.data import (
    build_training_prompt,
    encode_text,
    load_tokenizer,
    place_images_first,
    process_images,
    scoring_prompt_ids,
    tokenizer_image_token,
)
from qscorer.data.conversation import ANSWER_PREFIX, SCORING_QUESTION, level_word_ids
from qscorer.demo import DEMO_EPOCHS, DEMO_NUM_TEST, DEMO_NUM_TRAIN, synth_arguments, training_arguments
from qscorer.demo_base import SHIPPED_BASE
from qscorer.evaluation import compute_metrics
from qscorer.model.image_processing import load_image
from qscorer.train.arguments import parse_arguments
from qscorer.train.train import train

logger = logging.getLogger("paper_claim_miniature")

ARMS = {
    "qscorer": ("train.json", []),
    "level_words": ("train_levels.json", []),
    "level_words_soft_labels": (
        "train_levels.json",
        ["--rating_tokens", "level_words", "--weight_soft_kl", "1.0", "--weight_in_level", "1.0"],
    ),
}
"""Each arm's training meta and extra training flags."""


def readout_prompts(tokenizer) -> dict[str, torch.Tensor]:
    """Prompt ids ending in "is" that the scores are read after: the original's batch-evaluation prompt ("eval",
    the published numbers; no system message, image after the question) and the prefix of the training prompt
    ("training": v1 template, image first), which a model trained from scratch has actually seen."""
    conversation = [
        {"from": "human", "value": f"{SCORING_QUESTION}\n{DEFAULT_IMAGE_TOKEN}"},
        {"from": "gpt", "value": f"{ANSWER_PREFIX} {SCORE_TOKENS[2]}."},
    ]
    training = build_training_prompt(place_images_first(conversation, 1))
    training = training[: training.index(ANSWER_PREFIX) + len(ANSWER_PREFIX)]
    return {
        "eval": torch.tensor(scoring_prompt_ids(tokenizer, "eval")),
        "training": torch.tensor(tokenizer_image_token(training, tokenizer)),
    }


@torch.inference_mode()
def predict(arm: str, model, tokenizer, prompt: torch.Tensor, image_paths, batch_size: int):
    """Scores of one arm after one prompt, and (Q-Scorer arm) the share of images whose appended token is the one
    the head was trained at.

    ``qscorer``: the head's output (not clamped) at the token the model appends after "is" (``predict_scores``).
    ``level_words``: sum over the five level words of softmax(their logits after "is") x (1..5).
    """
    level_ids = torch.tensor(level_word_ids(tokenizer))
    values = torch.arange(1, 6, dtype=torch.float32)
    trained_token = _token_before_score_token(tokenizer)
    scores, on_trained_token = [], 0
    for start in range(0, len(image_paths), batch_size):
        pixels = process_images([load_image(path) for path in image_paths[start : start + batch_size]])
        input_ids = prompt.expand(len(pixels), -1)
        if arm == "qscorer":
            prediction = model.predict_scores(input_ids, pixels)
            scores += prediction.scores.float().tolist()
            on_trained_token += int((prediction.token_ids == trained_token).sum())
        else:
            logits = model.forward_mlp(input_ids=input_ids, images=pixels, logits_to_keep=1).logits
            scores += (logits[:, -1, level_ids].float().softmax(dim=-1) @ values).tolist()
    return scores, (on_trained_token / len(image_paths) if arm == "qscorer" else None)


def _token_before_score_token(tokenizer) -> int:
    """The piece the trained answer has between "is" and the score token (the lone space "▁")."""
    prefix = encode_text(ANSWER_PREFIX, tokenizer, add_bos=False)
    return encode_text(f"{ANSWER_PREFIX} {SCORE_TOKENS[2]}", tokenizer, add_bos=False)[len(prefix)]


def run_arm(name: str, data: Path, output: Path, seed: int, epochs: float) -> dict:
    """Fine-tune the shipped base on one arm's answers with the demo's recipe; held-out metrics per prompt."""
    argv = training_arguments(SHIPPED_BASE, data, output, epochs=epochs, seed=seed)[1:]
    meta, extra = ARMS[name]
    argv[argv.index("--data_paths") + 1] = str(data / "metas" / meta)
    argv += extra
    wall_start = time.perf_counter()
    run = train(*parse_arguments(argv))
    result = {
        "seed": seed,
        "train_seconds": round(time.perf_counter() - wall_start, 1),
        "logged_losses": run.losses[:1] + run.losses[-1:],
    }
    model = run.model.eval()
    test = json.loads((data / "metas" / "test.json").read_text())
    paths = [data / record["image"] for record in test]
    truth = [record["gt_score"] for record in test]
    for prompt_name, prompt in readout_prompts(run.tokenizer).items():
        predictions, on_trained_token = predict(name, model, run.tokenizer, prompt, paths, batch_size=16)
        metrics = compute_metrics(predictions, truth, name=f"{name} seed {seed} ({prompt_name} prompt)")
        result[f"{prompt_name}_prompt"] = {
            **{key: metrics[key] for key in ("SRCC", "PLCC", "KRCC", "RMSE", "n")},
            "prediction_range": [min(predictions), max(predictions)],
            **({"appended_token_is_the_trained_one": on_trained_token} if on_trained_token is not None else {}),
        }
    return result


def summary(runs: list[dict]) -> dict:
    """Mean and standard deviation (n - 1) over seeds of each prompt's SRCC and PLCC."""
    table = {}
    for prompt in ("training_prompt", "eval_prompt"):
        for metric in ("SRCC", "PLCC"):
            values = [run[prompt][metric] for run in runs]
            table[f"{prompt}_{metric}"] = {"mean": statistics.fmean(values), "std": statistics.stdev(values)}
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds per arm (default 0 1 2)"
    )
    parser.add_argument(
        "--epochs", type=float, default=DEMO_EPOCHS, help=f"epochs per run (default {DEMO_EPOCHS}, the demo's)"
    )
    parser.add_argument("--num-train", type=int, default=DEMO_NUM_TRAIN)
    parser.add_argument("--num-test", type=int, default=DEMO_NUM_TEST)
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data (default 0, the demo's)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="arms to run (default all)")
    parser.add_argument("--work-dir", type=Path, help="keep data and models here (default: a temporary folder)")
    options = parser.parse_args(argv)
    if len(options.seeds) < 2:
        parser.error("give at least two seeds (the report has standard deviations)")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    report_stream = sys.stdout
    # The Trainer prints its logs and DeepSpeed (imported by transformers) logs to stdout: keep it for the report.
    with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory(prefix="qscorer-miniature-") as scratch:
        work = options.work_dir or Path(scratch)
        data = work / "synthetic"
        if not (data / "dataset.json").is_file():
            cli_main(
                synth_arguments(data, num_train=options.num_train, num_test=options.num_test, seed=options.data_seed)
            )
        level_word_ids(load_tokenizer(SHIPPED_BASE))
        runs = {
            name: [run_arm(name, data, work / f"{name}_seed{seed}", seed, options.epochs) for seed in options.seeds]
            for name in options.arms
        }

    means = {name: summary(arm_runs) for name, arm_runs in runs.items()}
    report = {
        "benchmark": "paper_claim_miniature",
        "claim": "a score token + regression head ranks quality better than the expected level of level-word tokens",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(options).items()},
        "summary": means,
        "qscorer_minus_arm": {
            name: {key: means["qscorer"][key]["mean"] - value["mean"] for key, value in arm.items()}
            for name, arm in means.items()
            if name != "qscorer" and "qscorer" in means
        },
        "runs": runs,
    }
    print(json.dumps(report, indent=2), file=report_stream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
