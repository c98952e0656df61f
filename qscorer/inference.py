"""Batch inference over test metas, the original's iqa_eval.py made robust (``qscorer infer`` runs it).

For each meta file, ``<save-dir>/<meta file name>`` receives one JSON line per record, in meta order:
``{"id", "image", "gt_score", "logits": {"<score5>": .., .., "<score1>": ..}, "score"}`` (+ ``"probs"`` with
``--with-prob``). An image that cannot be read, or whose score or logits are not finite, gives ``{"id", "image",
"gt_score", "error"}`` and the run goes on. Every line is strict JSON (no NaN or Infinity); an empty meta gives an
empty output file.

Work in progress lives in part files (``.<name>.part<rank>``), appended and flushed batch by batch; when a meta is
done, they are merged into the output in meta order and removed. A rerun skips every record already in the output
or in a part file (a line cut short by a killed process is dropped), so resuming never loses or duplicates a record.
Under ``torchrun`` each process scores every world_size-th pending record; ``qscorer.ray_inference`` scores the
pending records on Ray and writes them through the same part files.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from .data.records import finite_number, read_json_records
from .errors import QScorerError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TestRecord:
    """One record of a test meta: its position, id, image path (as written in the meta) and MOS (or None)."""

    index: int
    id: str
    image: str
    gt_score: float | None


def load_test_records(meta_path: str | os.PathLike) -> list[TestRecord]:
    """Records of a test meta (JSON list or JSON lines); each needs "image" (or "img_path"); "id" defaults to it.

    Errors name the file and the record index; ids must be unique; "gt_score", when present and not null, must be a
    finite number (or a numeric string). An empty meta (``[]`` or an empty file) has no records.
    """
    records, seen = [], {}
    for index, raw in enumerate(read_json_records(meta_path)):
        where = f"{meta_path}, record {index}"
        if not isinstance(raw, dict):
            raise QScorerError(f"{where}: expected an object, got {type(raw).__name__}")
        image = raw.get("image", raw.get("img_path"))
        if not isinstance(image, str) or not image:
            raise QScorerError(f"{where}: missing or non-string 'image'")
        record_id = str(raw.get("id", image))
        if record_id in seen:
            raise QScorerError(f"{where}: id {record_id!r} repeats record {seen[record_id]}")
        seen[record_id] = index
        gt_score = raw.get("gt_score")
        if gt_score is not None and finite_number(gt_score) is None:
            raise QScorerError(f"{where}: gt_score {gt_score!r} is not a finite number")
        records.append(TestRecord(index, record_id, image, finite_number(gt_score)))
    return records


def read_json_lines(path: Path) -> list[dict]:
    """Complete JSON lines of a file; a last line cut short (no newline, or not valid JSON) is dropped from the
    file so that appending continues cleanly."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        logger.warning("%s: dropping an incomplete last line (%d bytes)", path, len(data) - end)
        with open(path, "r+b") as handle:
            handle.truncate(end)
    lines = []
    for number, line in enumerate(data[:end].splitlines(), start=1):
        if line.strip():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise QScorerError(f"{path}, line {number}: not valid JSON ({error.msg})") from error
    return lines


class MetaInference:
    """Scores one meta file's records into ``save_dir`` with a :class:`~qscorer.scoring.Scorer`.

    ``scorer`` may be None for an engine that scores elsewhere and writes through :meth:`line` and :meth:`append`
    (``qscorer.ray_inference``).
    """

    def __init__(self, scorer, meta_path, root_dir, save_dir, *, with_prob: bool, rank: int = 0, world_size: int = 1):
        self.scorer = scorer
        self.meta_path = Path(meta_path)
        self.root_dir = Path(root_dir)
        self.output = Path(save_dir) / self.meta_path.name
        self.with_prob = with_prob
        self.rank, self.world_size = rank, world_size

    def _part_files(self) -> list[Path]:
        return sorted(self.output.parent.glob(f".{self.output.name}.part*"))

    def done_records(self, retry_failed: bool = False) -> dict[str, dict]:
        """Records already written (output, then part files: later lines win), by id; with ``retry_failed``,
        failures don't count."""
        done = {}
        for path in [self.output, *self._part_files()]:
            for line in read_json_lines(path):
                if "id" not in line:
                    raise QScorerError(f"{path}: a line without 'id' ({line}); was it written by another tool?")
                if retry_failed and "error" in line:
                    continue
                done[str(line["id"])] = line
        return done

    def pending(self, retry_failed: bool = False) -> list[TestRecord]:
        """The meta's records that are not written yet (every process must read this before any writes)."""
        records = load_test_records(self.meta_path)
        done = self.done_records(retry_failed)
        pending = [record for record in records if record.id not in done]
        logger.info("%s: %d records, %d to score", self.meta_path, len(records), len(pending))
        return pending

    def image_path(self, record: TestRecord) -> Path:
        """Where the image of ``record`` is read from (its path in the meta, under ``root_dir``)."""
        return self.root_dir / record.image

    def open_part(self) -> TextIO:
        """This process's part file, opened for appending (:meth:`append`)."""
        self.output.parent.mkdir(parents=True, exist_ok=True)
        return open(self.output.with_name(f".{self.output.name}.part{self.rank}"), "a", encoding="utf-8")

    def run(self, pending: list[TestRecord]) -> int:
        """Score this process's share (every world_size-th) of ``pending``; returns how many it scored."""
        pending = pending[self.rank :: self.world_size]
        if not pending:
            return 0
        with self.open_part() as part:
            progress = tqdm(total=len(pending), desc=self.meta_path.name, unit="img", disable=self.rank != 0)
            for indices, pixels, errors in self.scorer.loader([self.image_path(record) for record in pending]):
                records = [pending[index] for index in indices]
                names, batch_errors = [record.image for record in records], [errors.get(i) for i in indices]
                results = self.scorer.batch_results(names, pixels, batch_errors)
                self.append(part, [self.line(record, result) for record, result in zip(records, results)])
                progress.update(len(indices))
            progress.close()
        return len(pending)

    def line(self, record: TestRecord, result) -> dict:
        """The output line of ``record`` from its :class:`~qscorer.scoring.ImageScore` (a failure record when
        ``result.error`` is set)."""
        line = {"id": record.id, "image": record.image, "gt_score": record.gt_score}
        if result.error is not None:
            logger.error("%s", result.error)
            line["error"] = result.error
            return line
        line["logits"] = result.logits
        line["score"] = result.score
        if self.with_prob:
            line["probs"] = result.probs
        return line

    @staticmethod
    def append(part: TextIO, lines: list[dict]) -> None:
        """Append ``lines`` to an open part file and make them durable (a killed process keeps them)."""
        for line in lines:
            part.write(json.dumps(line, allow_nan=False) + "\n")
        part.flush()
        os.fsync(part.fileno())

    def finalize(self) -> int:
        """Merge the output and the part files into the output, in meta order, and remove the part files; returns
        how many of the meta's records failed.

        A record written more than once (a retried failure) keeps its newest line.
        """
        records = load_test_records(self.meta_path)
        done = self.done_records()
        missing = [record.id for record in records if record.id not in done]
        if missing:
            raise QScorerError(f"{self.output}: {len(missing)} records were not scored, e.g. {missing[:3]}")
        if not records:
            logger.warning("%s has no records: writing an empty %s", self.meta_path, self.output)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.output.with_name(f".{self.output.name}.tmp")
        with open(temporary, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(done[record.id], allow_nan=False) + "\n")
        os.replace(temporary, self.output)
        for path in self._part_files():
            path.unlink()
        failed = sum("error" in done[record.id] for record in records)
        logger.info("wrote %s (%d records, %d failed)", self.output, len(records), failed)
        return failed


def infer_metas(scorer, meta_paths, root_dir, save_dir, *, with_prob: bool = False, retry_failed: bool = False) -> int:
    """Score every meta of ``meta_paths`` into ``save_dir``; returns how many records failed.

    Inside an initialised ``torch.distributed`` process group each process scores its share and rank 0 merges the
    outputs (the count of failures is rank 0's).
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    def barrier() -> None:
        if distributed:
            dist.barrier()

    failed = 0
    for meta_path in meta_paths:
        job = MetaInference(
            scorer, meta_path, root_dir, save_dir, with_prob=with_prob, rank=rank, world_size=world_size
        )
        pending = job.pending(retry_failed)
        barrier()
        job.run(pending)
        barrier()
        if rank == 0:
            failed += job.finalize()
        barrier()
    return failed
