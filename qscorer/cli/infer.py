"""``qscorer infer``: batch inference over test metas, one JSON-lines file per meta, resumable, ``torchrun``-aware;
``--engine ray`` runs it on Ray Data instead (the ``ray`` extra, imported only then)."""

from __future__ import annotations

import logging
import os

from ..errors import QScorerError
from .options import add_model_arguments, add_scoring_arguments, build_scorer, scorer_options

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
    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--engine",
        choices=["torch", "ray"],
        default="torch",
        help="torch (default): this process, or each torchrun process; ray: Ray Data, images decoded in CPU tasks "
        "and scored in an actor pool (pip install 'qscorer[ray]'; --num-workers does not apply)",
    )
    engine.add_argument(
        "--ray-address", default=None, help="Ray cluster (auto, HOST:PORT, ray://...); default: RAY_ADDRESS or local"
    )
    engine.add_argument("--num-actors", type=int, default=None, help="scoring actors (default 1)")
    engine.add_argument("--num-gpus-per-actor", type=float, default=None, help="GPUs per actor (default 0: CPU)")


def run(args) -> int:
    with_prob = _truthy(args.with_prob)
    ray_flags = {
        "--ray-address": args.ray_address,
        "--num-actors": args.num_actors,
        "--num-gpus-per-actor": args.num_gpus_per_actor,
    }
    given = [flag for flag, value in ray_flags.items() if value is not None]
    if given and args.engine != "ray":
        raise QScorerError(f"{', '.join(given)} only apply with --engine ray")
    failed = (_run_on_ray if args.engine == "ray" else _run_with_torch)(args, with_prob)
    if failed:
        logger.error("%d record(s) failed (see their 'error' field)", failed)
    return 2 if failed else 0


def _run_with_torch(args, with_prob: bool) -> int:
    import torch
    import torch.distributed as dist

    from ..inference import infer_metas

    device = args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        if use_cuda:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        scorer = build_scorer(args, device=device)
        return infer_metas(
            scorer, args.meta_paths, args.root_dir, args.save_dir, with_prob=with_prob, retry_failed=args.retry_failed
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_on_ray(args, with_prob: bool) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise QScorerError("--engine ray runs in one driver process: start it without torchrun")
    from ..ray_inference import infer_metas_ray

    options = scorer_options(args)
    options.pop("num_workers")
    return infer_metas_ray(
        args.meta_paths,
        args.root_dir,
        args.save_dir,
        model_path=args.model_path,
        model_base=args.model_base,
        preprocessor_path=args.preprocessor_path,
        with_prob=with_prob,
        retry_failed=args.retry_failed,
        address=args.ray_address,
        num_actors=1 if args.num_actors is None else args.num_actors,
        num_gpus_per_actor=0 if args.num_gpus_per_actor is None else args.num_gpus_per_actor,
        **options,
    )


def _truthy(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if value.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise QScorerError(f"--with-prob expects true or false, got {value!r}")
