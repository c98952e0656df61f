"""Scoring with Ray Data (the ``ray`` extra): CPU tasks decode and preprocess the images, actors score them.

    import ray
    from qscorer.ray_data import score_dataset

    images = ray.data.read_parquet("images.parquet")          # a column "image" of encoded image bytes
    scored = score_dataset(images, "checkpoints/Qscorer_lora_5_1", model_base="models/mplug-owl2-llama2-7b",
                           num_actors=4, num_gpus_per_actor=1)
    scored.write_parquet("scores/")

:func:`score_dataset` chains the two public steps, which also fit pipelines of one's own:

- :func:`decode_batch`, for ``map_batches`` in CPU tasks: image bytes, paths or uint8 arrays -> ``pixels``
  (float32 [3, 448, 448], through the one preprocessing path of :mod:`qscorer.model.image_processing`) and ``error``;
- :class:`BatchScorer`, for ``map_batches`` in an actor pool: each actor loads one
  :class:`~qscorer.scoring.Scorer` and replaces ``pixels`` by ``score``, the five score-token logits
  ``<score5>`` .. ``<score1>`` and ``token_id`` (``prob_<score5>`` .. with ``with_prob``).

An image that cannot be read keeps its message in ``error`` (null otherwise) and gets nulls in the score columns;
the job goes on. ray is imported only inside the functions that need it, and nothing else in qscorer imports this
module (except ``qscorer.ray_inference``, behind ``qscorer infer --engine ray``).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings

import numpy as np

from .constants import SCORE_TOKENS_REPORT_ORDER
from .errors import QScorerError
from .model.image_processing import IMAGE_SIZE, image_from_array, load_image, pixel_values

PIXELS = "pixels"
ERROR = "error"
SCORE = "score"
TOKEN_ID = "token_id"
PROB_PREFIX = "prob_"
"""Column names: ``pixels`` and ``error`` (from :func:`decode_batch`), ``score``, ``token_id``, the logits under the
score tokens' names (``<score5>`` .. ``<score1>``) and the probabilities under ``prob_<score5>`` ..."""


def require_ray():
    """The ``ray`` module with Ray Data, or a :class:`QScorerError` saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise QScorerError(f"the Ray engine needs Ray Data ({error}): pip install 'qscorer[ray]'") from None
    return ray


@contextlib.contextmanager
def raising_user_errors():
    """Turn a Ray error caused by a :class:`QScorerError` in a worker (a model folder that does not exist, a missing
    column, ...) back into that one-line error; Ray passes the worker's exception on only as text."""
    ray = require_ray()
    try:
        yield
    except ray.exceptions.RayError as error:
        messages = re.findall(r"qscorer\.[\w.]*Error: (.+)", str(error))
        if not messages:
            raise
        raise QScorerError(messages[-1].strip()) from error


def decode_batch(batch: dict, *, image_column: str = "image", root_dir=None, name_column: str | None = None):
    """CPU step: decode and preprocess ``batch[image_column]`` into ``pixels`` [3, 448, 448] and ``error``.

    Values may be encoded image bytes, paths (under ``root_dir`` when given) or uint8 arrays [H, W(, 1|3|4)]. A row
    that cannot be read gets zero pixels and its message in ``error`` (null for the others). A column of paths is
    kept; bytes and arrays are dropped (the pixels replace them). Messages name the image by ``name_column`` when
    given, else by its path. Returns a pyarrow table (typed columns, also where every row succeeded).
    """
    import pyarrow as pa

    if image_column not in batch:
        raise QScorerError(f"no column {image_column!r} in the dataset (columns: {sorted(batch)})")
    sources = batch[image_column]
    names = batch[name_column] if name_column is not None else [None] * len(sources)
    pixels = np.zeros((len(sources), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    errors = []
    for row, (source, name) in enumerate(zip(sources, names)):
        try:
            pixels[row] = pixel_values(_open_image(source, root_dir, None if name is None else str(name)))
            errors.append(None)
        except QScorerError as error:
            errors.append(str(error))
    holds_paths = all(isinstance(source, (str, os.PathLike)) for source in sources)
    kept = {key: values for key, values in batch.items() if key != image_column or holds_paths}
    kept[PIXELS] = pixels
    return _arrow_table(kept, {ERROR: pa.array(errors, pa.string())})


def _open_image(source, root_dir, name: str | None):
    if isinstance(source, np.ndarray):
        return image_from_array(source, name or "image array")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return load_image(io.BytesIO(source), name=name or "bytes")
    if isinstance(source, (str, os.PathLike)):
        return load_image(os.path.join(root_dir, source) if root_dir is not None else source, name=name)
    raise QScorerError(f"{name or 'image'}: expected image bytes, a path or an array, got {type(source).__name__}")


class BatchScorer:
    """The callable class for ``Dataset.map_batches`` in an actor pool: one scorer per actor, loaded once.

    ``BatchScorer(model_path, model_base=None, preprocessor_path=None, with_prob=False, **scorer_options)``: the
    checkpoint (folders or Hub ids; none: the published Q-Scorer) and the keywords of
    :class:`~qscorer.scoring.Scorer` (device, dtype, prompt, clamp, load_8bit / load_4bit, revision, ...).
    Called on a batch of :func:`decode_batch` (numpy format), it returns the batch without ``pixels``, with
    ``score``, ``<score5>`` .. ``<score1>``, ``token_id`` (``prob_<score5>`` .. with ``with_prob``) and ``error``.
    """

    def __init__(self, model_path=None, model_base=None, preprocessor_path=None, *, with_prob: bool = False, **options):
        from .scoring import Scorer

        self.scorer = Scorer(model_path, model_base, preprocessor_path, **options)
        self.with_prob = with_prob

    def __call__(self, batch: dict):
        import torch

        pixels = np.asarray(batch[PIXELS])
        errors = [None if error is None else str(error) for error in batch.get(ERROR, [None] * len(pixels))]
        good = [row for row, error in enumerate(errors) if error is None]
        results = self.scorer.batch_results([""] * len(errors), torch.from_numpy(pixels[good]), errors)
        kept = {key: values for key, values in batch.items() if key not in (PIXELS, ERROR)}
        return _arrow_table(kept, score_columns(results, self.with_prob))


def score_columns(results, with_prob: bool = False) -> dict:
    """Typed pyarrow columns of :class:`~qscorer.scoring.ImageScore` results (nulls where ``error`` is set)."""
    import pyarrow as pa

    def per_token(values_of):
        return {
            token: pa.array([None if values_of(r) is None else values_of(r)[token] for r in results], pa.float64())
            for token in SCORE_TOKENS_REPORT_ORDER
        }

    columns = {SCORE: pa.array([result.score for result in results], pa.float64())}
    columns.update(per_token(lambda result: result.logits))
    columns[TOKEN_ID] = pa.array([result.token_id for result in results], pa.int64())
    if with_prob:
        columns.update({PROB_PREFIX + token: values for token, values in per_token(lambda r: r.probs).items()})
    columns[ERROR] = pa.array([result.error for result in results], pa.string())
    return columns


def image_score_from_row(row: dict, name: str):
    """The :class:`~qscorer.scoring.ImageScore` of one output row of :class:`BatchScorer` (a dict)."""
    from .scoring import ImageScore

    if row.get(ERROR) is not None:
        return ImageScore(image=name, error=row[ERROR])
    with_prob = PROB_PREFIX + SCORE_TOKENS_REPORT_ORDER[0] in row
    probs = {token: row[PROB_PREFIX + token] for token in SCORE_TOKENS_REPORT_ORDER} if with_prob else None
    return ImageScore(
        image=name,
        score=row[SCORE],
        logits={token: row[token] for token in SCORE_TOKENS_REPORT_ORDER},
        probs=probs,
        token_id=row[TOKEN_ID],
    )


def _arrow_table(numpy_columns: dict, arrow_columns: dict):
    """A pyarrow table of numpy columns (converted as Ray Data does, tensors included) followed by typed pyarrow
    columns (so that a column of nulls keeps its type in every block)."""
    import pyarrow as pa
    from ray.data.block import BlockAccessor, BlockType

    if not numpy_columns:
        return pa.table(arrow_columns)
    table = BlockAccessor.batch_to_block(numpy_columns, block_type=BlockType.ARROW)
    for name, values in arrow_columns.items():
        table = table.append_column(name, values)
    return table


def check_pool(num_actors: int, num_gpus_per_actor: float, num_cpus_per_actor: float, batch_size: int) -> None:
    """Refuse an actor pool that cannot run (no actor, a batch of no image, negative resources)."""
    if num_actors < 1 or batch_size < 1:
        raise QScorerError(f"actors and batch size must be at least 1, got {num_actors} actors, batch {batch_size}")
    if num_gpus_per_actor < 0 or num_cpus_per_actor < 0:
        raise QScorerError(f"negative resources: {num_gpus_per_actor} GPUs, {num_cpus_per_actor} CPUs per actor")


def score_dataset(
    dataset,
    model_path=None,
    model_base=None,
    preprocessor_path=None,
    *,
    image_column: str = "image",
    root_dir=None,
    name_column: str | None = None,
    num_actors: int = 1,
    num_gpus_per_actor: float = 0,
    num_cpus_per_actor: float = 1,
    batch_size: int = 8,
    with_prob: bool = False,
    max_restarts: int = -1,
    max_task_retries: int = 3,
    **scorer_options,
):
    """``dataset`` (a Ray Dataset with images in ``image_column``) with the score columns of :class:`BatchScorer`.

    Decoding runs in CPU tasks (:func:`decode_batch`), scoring in ``num_actors`` actors with
    ``num_gpus_per_actor`` GPUs and ``num_cpus_per_actor`` CPUs each, ``batch_size`` images per call. Without GPUs
    the actors score on the CPU (``device="auto"`` becomes ``"cpu"``). A scoring actor that dies is restarted
    (``max_restarts``, -1: always) and its batches are retried (``max_task_retries`` times each); the other
    keywords go to :class:`~qscorer.scoring.Scorer`. Lazy, like every Ray Data transformation: nothing runs until
    the result is consumed (``write_parquet``, ``iter_batches``, ...).
    """
    ray = require_ray()
    check_pool(num_actors, num_gpus_per_actor, num_cpus_per_actor, batch_size)
    if not num_gpus_per_actor and scorer_options.get("device", "auto") == "auto":
        scorer_options["device"] = "cpu"
    locations = tuple(None if path is None else str(path) for path in (model_path, model_base, preprocessor_path))
    decoded = dataset.map_batches(
        decode_batch,
        fn_kwargs=dict(image_column=image_column, root_dir=root_dir, name_column=name_column),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=1,
    )
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for the actors' restart and retry limits yet; its deprecation warning of
        # extra remote arguments does not apply to them.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=Warning)
        return decoded.map_batches(
            BatchScorer,
            fn_constructor_args=locations,
            fn_constructor_kwargs=dict(with_prob=with_prob, **scorer_options),
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_gpus=num_gpus_per_actor,
            num_cpus=num_cpus_per_actor,
            max_restarts=max_restarts,
            max_task_retries=max_task_retries,
        )
