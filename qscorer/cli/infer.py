"""``qscorer infer``: batch inference over test metas, one JSON-lines file per meta, resumable, ``torchrun``-aware."""

from __future__ import annotations

import logging
import os

from ..errors import QScorerError
from .options import add_model_arguments, add_scoring_arguments, build_scorer, share_cpu_with_workers

logger = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--meta-paths", nargs="+", required=True, help="test metas (JSON list or JSON lines)")
    parser.add_argument("--root-dir", required=True, help="folder the metas' image paths are relative to")
    parser.add_argument("--save-dir", default="results", help="output folder (one JSON-lines file per meta)")
    add_scoring_arguments(parser, batch_size=16, num_workers=2)
    parser.add_argument(
        "--with-prob", nargs="?", const="true", default="false", help="also write the five probabilities"
    )
    parser.add_argument("--retry-failed", action="store_true", help="score again the records that failed before")


def run(args) -> int:
    import torch
    import torch.distributed as dist

    from ..inference import infer_metas

    with_prob = _truthy(args.with_prob)
    device = args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        if use_cuda:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        share_cpu_with_workers(args.num_workers, device)
        scorer = build_scorer(args, device=device)
        failed = infer_metas(
            scorer, args.meta_paths, args.root_dir, args.save_dir, with_prob=with_prob, retry_failed=args.retry_failed
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if failed:
        logger.error("%d record(s) failed (see their 'error' field)", failed)
    return 2 if failed else 0


def _truthy(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if value.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise QScorerError(f"--with-prob expects true or false, got {value!r}")
