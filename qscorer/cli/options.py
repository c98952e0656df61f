"""Options shared by several commands, and the objects built from them."""

from __future__ import annotations

import argparse
import logging
import os

logger = logging.getLogger(__name__)


def add_model_arguments(parser: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    """Where the checkpoint is and how to load it (the original's flag names); ``dtype=False`` leaves out
    ``--dtype`` for commands that choose the loading dtype themselves."""
    from ..hub import PUBLISHED_BASE, PUBLISHED_MODEL

    group = parser.add_argument_group("model")
    group.add_argument(
        "--model-path",
        default=None,
        help=f"LoRA checkpoint or merged model: a folder or a Hub id (default: {PUBLISHED_MODEL} on {PUBLISHED_BASE})",
    )
    group.add_argument("--model-base", default=None, help="base model of a LoRA checkpoint: a folder or a Hub id")
    group.add_argument(
        "--preprocessor-path", default=None, help="tokenizer / image-processor configs (default: the model folders)"
    )
    group.add_argument("--revision", default=None, help="branch, tag or commit of a Hub --model-path")
    group.add_argument("--base-revision", default=None, help="branch, tag or commit of a Hub --model-base")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    if dtype:
        group.add_argument(
            "--dtype",
            default="auto",
            help="float32, float16, bfloat16 or auto (fp32 on CPU, bf16 on GPU; 8/4-bit: bf16 on CPU, fp16 on GPU)",
        )
        quantization = group.add_mutually_exclusive_group()
        quantization.add_argument("--load-8bit", action="store_true", help="LLM linear layers in 8 bits (bitsandbytes)")
        quantization.add_argument("--load-4bit", action="store_true", help="LLM linear layers in 4 bits, NF4")
    group.add_argument(
        "--attn-implementation", default=None, choices=["sdpa", "eager", "flash_attention_2"], help="default: sdpa"
    )
    group.add_argument(
        "--allow-unexpected-keys", action="store_true", help="load checkpoints that carry weights the model lacks"
    )


def add_scoring_arguments(parser: argparse.ArgumentParser, *, batch_size: int, num_workers: int) -> None:
    """How images are scored: prompt, clamping, batch size and decoding workers."""
    from ..data.conversation import SCORING_PROMPT_KINDS

    parser.add_argument(
        "--prompt",
        choices=SCORING_PROMPT_KINDS,
        default="eval",
        help="eval (default, the published numbers), scorer (the original scorer.py's) or training (the fine-tuning "
        "template up to the answer, the context the score token was trained after)",
    )
    parser.add_argument("--no-clamp", action="store_true", help="do not clamp scores to [0, 5] (the original's CLIs)")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--num-workers", type=int, default=num_workers, help="DataLoader workers that decode images")


def model_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of ``load_pretrained_model`` (after the three paths) from :func:`add_model_arguments`."""
    options = dict(
        device=args.device,
        attn_implementation=args.attn_implementation,
        allow_unexpected_keys=args.allow_unexpected_keys,
        revision=args.revision,
        base_revision=args.base_revision,
    )
    if hasattr(args, "dtype"):
        options.update(dtype=args.dtype, load_8bit=args.load_8bit, load_4bit=args.load_4bit)
    return options


def scorer_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of :class:`~qscorer.scoring.Scorer` (after the three paths) from the model and scoring
    options."""
    return dict(
        model_options(args),
        prompt=args.prompt,
        clamp=not args.no_clamp,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )


def build_scorer(args: argparse.Namespace, **overrides):
    """A :class:`~qscorer.scoring.Scorer` from the model and scoring options (``overrides`` replace any keyword),
    after :func:`share_cpu_with_workers`."""
    from ..scoring import Scorer

    options = {**scorer_options(args), **overrides}
    share_cpu_with_workers(options["num_workers"], options["device"])
    return Scorer(args.model_path, args.model_base, args.preprocessor_path, **options)


def share_cpu_with_workers(num_workers: int, device: str) -> None:
    """On CPU, leave one core per DataLoader worker: torch's intra-op threads slow down several-fold when the
    decoding workers already occupy every core."""
    import torch

    from ..loading import resolve_device

    if num_workers > 0 and resolve_device(device).type == "cpu":
        threads = max(1, (os.cpu_count() or 1) - num_workers)
        if threads < torch.get_num_threads():
            logger.info("%d decoding workers: torch uses %d CPU thread(s)", num_workers, threads)
            torch.set_num_threads(threads)
