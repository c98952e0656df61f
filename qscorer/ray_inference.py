"""``qscorer infer --engine ray``: the batch inference of :mod:`qscorer.inference` on Ray Data (the ``ray`` extra).

Same metas, same files: the records not written yet (by id, as with the default engine) of every meta are decoded
in Ray CPU tasks and scored in one actor pool (:func:`qscorer.ray_data.score_dataset`, so the model is loaded once
per actor for the whole run); the driver appends every batch that comes back to its meta's part file, and
``MetaInference.finalize`` writes each output in meta order. A scoring actor that dies is replaced (the new one
loads the model again) and its batches are retried; records are keyed by id, so a batch written twice still gives
one line. A driver that dies loses nothing it has written: a rerun scores only the missing records. Image paths
(the metas' paths under ``root_dir``) and model folders must be readable by the Ray workers: on a cluster, give
absolute paths on a shared filesystem.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math

from tqdm import tqdm

from .errors import QScorerError
from .inference import MetaInference
from .ray_data import check_pool, image_score_from_row, raising_user_errors, require_ray, score_dataset

logger = logging.getLogger(__name__)

MAX_BLOCKS = 10_000
"""At most this many blocks of pending records: results come back block by block."""


def infer_metas_ray(
    meta_paths,
    root_dir,
    save_dir,
    *,
    model_path=None,
    model_base=None,
    preprocessor_path=None,
    with_prob: bool = False,
    retry_failed: bool = False,
    address: str | None = None,
    num_actors: int = 1,
    num_gpus_per_actor: float = 0,
    batch_size: int = 16,
    **scorer_options,
) -> int:
    """Score every meta of ``meta_paths`` into ``save_dir`` on Ray; returns how many records failed.

    Ray (:func:`ray_session` at ``address``) starts only when a record is pending. The other keywords are those of
    :func:`qscorer.ray_data.score_dataset`.
    """
    ray = require_ray()
    check_pool(num_actors, num_gpus_per_actor, 1, batch_size)
    jobs = [MetaInference(None, meta_path, root_dir, save_dir, with_prob=with_prob) for meta_path in meta_paths]
    pending = [job.pending(retry_failed) for job in jobs]
    rows = [
        {"meta": index, "id": record.id, "image": str(job.image_path(record))}
        for index, (job, records) in enumerate(zip(jobs, pending))
        for record in records
    ]
    if rows:
        with ray_session(address), raising_user_errors():
            # One block per batch (at most MAX_BLOCKS), so that scores come back, and are written, batch by batch.
            blocks = min(math.ceil(len(rows) / batch_size), MAX_BLOCKS)
            scored = score_dataset(
                ray.data.from_items(rows, override_num_blocks=blocks),
                model_path,
                model_base,
                preprocessor_path,
                with_prob=with_prob,
                num_actors=num_actors,
                num_gpus_per_actor=num_gpus_per_actor,
                batch_size=batch_size,
                **scorer_options,
            )
            _write_scores(jobs, pending, scored)
    return sum(job.finalize() for job in jobs)


@contextlib.contextmanager
def ray_session(address: str | None = None):
    """Use this process's Ray session if there is one, else connect to ``address`` (``ray.init``: None finds a
    running cluster through ``RAY_ADDRESS`` or starts a local one) and shut down on exit."""
    ray = require_ray()
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=address)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise QScorerError(f"cannot start or reach Ray at {address or 'a local cluster'}: {error}") from None
    logger.info("Ray cluster resources: %s", ray.cluster_resources())
    try:
        yield
    finally:
        ray.shutdown()


def _write_scores(jobs: list[MetaInference], pending: list[list], scored) -> None:
    """Append the rows of ``scored`` (:class:`~qscorer.ray_data.BatchScorer` output, in any order; ``meta`` is the
    index of their job) to the part files of their metas as they arrive."""
    records = [{record.id: record for record in records} for records in pending]
    with contextlib.ExitStack() as stack:
        parts = {index: stack.enter_context(jobs[index].open_part()) for index, todo in enumerate(pending) if todo}
        progress = stack.enter_context(tqdm(total=sum(map(len, pending)), desc="scoring on Ray", unit="img"))
        for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            lines = collections.defaultdict(list)
            for row in batch.to_pylist():
                record = records[row["meta"]][row["id"]]
                result = image_score_from_row(row, record.image)
                lines[row["meta"]].append(jobs[row["meta"]].line(record, result))
            for index, meta_lines in lines.items():
                jobs[index].append(parts[index], meta_lines)
            progress.update(batch.num_rows)
