"""``qscorer serve``: an HTTP scoring service with dynamic batching and a web page (needs the ``serve`` extra)."""

from __future__ import annotations

import argparse
import os

from .options import add_model_arguments, add_scoring_arguments, build_scorer, model_options

API_KEY_VARIABLE = "QSCORER_API_KEY"


def decode_threads_default() -> int:
    """Threads that decode uploads: half the cores (at most 8), so that on CPU the model keeps the other half."""
    return max(1, min(8, (os.cpu_count() or 1) // 2))


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    add_scoring_arguments(parser, batch_size=8, num_workers=decode_threads_default())
    server = parser.add_argument_group("service")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    server.add_argument("--port", type=int, default=8000, help="default 8000; 0: any free port (printed at start)")
    server.add_argument(
        "--max-batch-size", dest="batch_size", metavar="N", type=int, default=argparse.SUPPRESS,
        help="most images scored in one model batch (the same option as --batch-size; default 8)",
    )
    server.add_argument(
        "--max-wait-ms", type=float, default=10.0,
        help="how long the oldest waiting image may wait for its batch to fill (default 10)",
    )
    server.add_argument(
        "--max-queue", type=int, default=256,
        help="images admitted at once (decoding, waiting or scoring); more get 503 + Retry-After (default 256)",
    )
    server.add_argument("--max-image-bytes", type=int, default=16 * 2**20, help="largest image file (default 16 MiB)")
    server.add_argument(
        "--max-images-per-request", type=int, default=64, help="most images in one request (default 64)"
    )
    server.add_argument(
        "--api-key", default=os.environ.get(API_KEY_VARIABLE),
        help=f"require 'Authorization: Bearer KEY' on /score and /info (default: ${API_KEY_VARIABLE}, else none)",
    )
    server.add_argument("--no-access-log", action="store_true", help="do not log each request")


def run(args) -> int:
    from ..errors import QScorerError
    from ..serving import ServeSettings, create_app, serve
    from ..serving.server import listen

    if args.batch_size < 1:
        raise QScorerError(f"--max-batch-size must be at least 1, got {args.batch_size}")
    settings = ServeSettings(
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_image_bytes=args.max_image_bytes,
        max_images_per_request=args.max_images_per_request,
        api_key=args.api_key or None,
        decode_threads=args.num_workers,
    )
    sock = listen(args.host, args.port)
    scorer = build_scorer(args)
    model_info = {
        "model_path": args.model_path,
        "model_base": args.model_base,
        "preprocessor_path": args.preprocessor_path,
        **model_options(args),
    }
    app = create_app(scorer, settings, model_info=model_info)
    return serve(app, sock=sock, access_log=not args.no_access_log)
