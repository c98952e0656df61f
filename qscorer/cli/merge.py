"""``qscorer merge``: a LoRA checkpoint merged into a self-contained model folder (plain transformers loads it)."""

from __future__ import annotations

from pathlib import Path

from ..errors import QScorerError
from .options import add_model_arguments, model_options


def add_arguments(parser) -> None:
    add_model_arguments(parser, dtype=False)
    parser.set_defaults(device="cpu")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "--torch-dtype", choices=["float16", "bfloat16", "float32"], default="float16", help="saved weights' dtype"
    )
    parser.add_argument("--no-remote-code", action="store_true", help="do not write the modeling files")
    parser.add_argument("--max-shard-size", default="5GB")


def run(args) -> int:
    """Load straight into ``--torch-dtype`` (each LoRA delta is added in float32 before that one cast) and save."""
    from ..export import export_model
    from ..loading import DTYPES, load_pretrained_model

    output = Path(args.output_dir)
    if output.exists() and any(output.iterdir()):
        raise QScorerError(f"output folder {output} is not empty")
    options = dict(model_options(args), dtype=args.torch_dtype)
    tokenizer, model, image_processor, _ = load_pretrained_model(
        args.model_path, args.model_base, args.preprocessor_path, **options
    )
    export_model(
        model,
        tokenizer,
        image_processor,
        output,
        dtype=DTYPES[args.torch_dtype],
        remote_code=not args.no_remote_code,
        max_shard_size=args.max_shard_size,
    )
    print(output)
    return 0
