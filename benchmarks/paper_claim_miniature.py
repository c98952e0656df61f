"""The paper's claim in miniature: a score token + regression head (Q-Scorer) against level-word answers scored by
the expected level (the Q-Align-style baseline the paper argues against), trained from scratch on CPU with the
same model, data, steps and optimizer. Prints JSON (held-out SRCC / PLCC / KRCC / RMSE per arm, minutes).

    python benchmarks/paper_claim_miniature.py [--steps 800] [--work-dir DIR] > miniature.json

Both arms start from the same randomly initialised tiny mPLUG-Owl2 (``qscorer.demo.tiny_config``: LLM 128 wide,
vision and abstractor 64 wide, 2 layers each, 28-px patches, width-scaled init) with the demo tokenizer, are
trained in full (no LoRA; vision encoder and abstractor trainable) on the synthetic IQA set of ``qscorer synth``
and evaluated on its held-out test split (no overlapping content):

- ``qscorer``: answers "The quality of the image is <scoreN>."; loss CE + squared error of the head at the position
  predicting the score token; score = the head's output at the token the model appends after "is".
- ``level_tokens``: answers "The quality of the image is good." (metas/train_levels.json); loss CE only; score =
  sum over the five level words of softmax(their logits after "is") x (1..5).

Each arm is read out after two prompts: the original's batch-evaluation prompt (``eval_prompt``, the published
numbers' prompt, which differs from the training prompt) and the training prompt's prefix (``training_prompt``).
The head's output bias starts at 3 (``--head-bias``; ``--no-head-bias`` keeps the original's 0): training clamps the
head's output to [0, 5], and a head whose outputs all fall below 0 early on never gets a gradient again.

This is a smoke-scale illustration, not a reproduction: a tiny model trained for minutes on synthetic distortions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from qscorer.constants import DEFAULT_IMAGE_TOKEN, LEVEL_WORDS, SCORE_TOKENS
from qscorer.data import (
    build_demo_tokenizer,
    build_training_prompt,
    encode_text,
    load_tokenizer,
    place_images_first,
    process_images,
    scoring_prompt_ids,
    tokenizer_image_token,
)
from qscorer.data.conversation import ANSWER_PREFIX, SCORING_QUESTION
from qscorer.data.demo_tokenizer import DEMO_VOCAB_SIZE
from qscorer.data.synthetic import build_synthetic_iqa
from qscorer.demo import tiny_config
from qscorer.evaluation import compute_metrics
from qscorer.model.image_processing import load_image
from qscorer.train.arguments import parse_arguments
from qscorer.train.setup import write_base_model
from qscorer.train.train import train

logger = logging.getLogger("paper_claim_miniature")

ARMS = {"qscorer": "train.json", "level_tokens": "train_levels.json"}


def level_word_ids(tokenizer) -> list[int]:
    """The first piece of each level word after the answer prefix, bad..excellent; they must differ."""
    prefix = encode_text(ANSWER_PREFIX, tokenizer, add_bos=False)
    ids = []
    for word in LEVEL_WORDS:
        answer = encode_text(f"{ANSWER_PREFIX} {word}", tokenizer, add_bos=False)
        if answer[: len(prefix)] != prefix:
            raise SystemExit(f"the tokenizer splits the answer prefix differently before {word!r}")
        ids.append(answer[len(prefix)])
    if len(set(ids)) != len(ids):
        raise SystemExit(f"level words share a first piece: {dict(zip(LEVEL_WORDS, ids))}")
    return ids


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
    ``level_tokens``: sum over the five level words of softmax(their logits after "is") x (1..5).
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


def run_arm(name: str, base: Path, data: Path, output: Path, options: argparse.Namespace) -> dict:
    argv = [
        "--model_name_or_path", str(base), "--version", "v1", "--lora_enable", "False",
        "--data_paths", str(data / "metas" / ARMS[name]), "--image_folder", str(data), "--image_aspect_ratio", "pad",
        "--output_dir", str(output), "--max_steps", str(options.steps),
        "--per_device_train_batch_size", str(options.batch_size), "--learning_rate", str(options.learning_rate),
        "--weight_decay", "0.0", "--warmup_ratio" if _has_warmup_ratio() else "--warmup_steps", "0.03",
        "--lr_scheduler_type", "cosine", "--logging_steps", str(max(1, options.steps // 20)),
        "--save_strategy", "no", "--report_to", "none",
        "--tune_visual_abstractor", "True", "--freeze_vision_model", "False", "--weight_next_token", "1.0",
        "--model_max_length", "512", "--dataloader_num_workers", "0", "--seed", str(options.seed),
    ]
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    run = train(*parse_arguments(argv))
    train_cpu, train_wall = time.process_time() - cpu_start, time.perf_counter() - wall_start
    model = run.model.eval()
    test = json.loads((data / "metas" / "test.json").read_text())
    paths = [data / record["image"] for record in test]
    truth = [record["gt_score"] for record in test]
    result = {
        "train_cpu_minutes": round(train_cpu / 60, 2),
        "train_wall_minutes": round(train_wall / 60, 2),
        "first_logged_loss": run.losses[0],
        "last_logged_loss": run.losses[-1],
    }
    for prompt_name, prompt in readout_prompts(run.tokenizer).items():
        predictions, on_trained_token = predict(name, model, run.tokenizer, prompt, paths, options.batch_size)
        metrics = compute_metrics(predictions, truth, name=f"{name} ({prompt_name} prompt)")
        result[f"{prompt_name}_prompt"] = {
            **{key: metrics[key] for key in ("SRCC", "PLCC", "KRCC", "RMSE", "n")},
            "prediction_range": [min(predictions), max(predictions)],
            **({"appended_token_is_the_trained_one": on_trained_token} if on_trained_token is not None else {}),
        }
    return result


def _has_warmup_ratio() -> bool:
    import dataclasses

    import transformers

    return "warmup_ratio" in {field.name for field in dataclasses.fields(transformers.TrainingArguments)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps per arm (default 800)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--num-train", type=int, default=800)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=128, help="synthetic image side before the 448 resize")
    parser.add_argument("--llm-width", type=int, default=128)
    parser.add_argument("--visual-width", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head-bias", type=float, default=3.0,
                        help="initial bias of the head's output layer (default 3, mid-scale)")
    parser.add_argument("--no-head-bias", dest="head_bias", action="store_const", const=None,
                        help="keep the original head init (N(0, 0.02) weights, zero bias)")
    parser.add_argument("--work-dir", type=Path, help="keep data and models here (default: a temporary folder)")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    report_stream = sys.stdout
    # The Trainer prints its logs and DeepSpeed (imported by transformers) logs to stdout: keep it for the report.
    with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory(prefix="qscorer-miniature-") as scratch:
        work = options.work_dir or Path(scratch)
        data = work / "synthetic"
        if not (data / "dataset.json").is_file():
            build_synthetic_iqa(data, num_train=options.num_train, num_test=options.num_test,
                                image_size=options.image_size, seed=options.seed, progress=False)
        tokenizer_dir = build_demo_tokenizer(work / "tokenizer")
        level_word_ids(load_tokenizer(tokenizer_dir))
        config = tiny_config(DEMO_VOCAB_SIZE, llm_width=options.llm_width, visual_width=options.visual_width,
                             patch_size=28)
        base = write_base_model(work / "base", config, tokenizer_dir, seed=options.seed, head_start=options.head_bias)
        results = {name: run_arm(name, base, data, work / name, options) for name in ARMS}

    report = {
        "benchmark": "paper_claim_miniature",
        "claim": "a score token + regression head ranks quality better than the expected level of level-word tokens",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(options).items()},
        "arms": results,
        "srcc_difference_eval_prompt": results["qscorer"]["eval_prompt"]["SRCC"]
        - results["level_tokens"]["eval_prompt"]["SRCC"],
        "plcc_difference_eval_prompt": results["qscorer"]["eval_prompt"]["PLCC"]
        - results["level_tokens"]["eval_prompt"]["PLCC"],
    }
    print(json.dumps(report, indent=2), file=report_stream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
