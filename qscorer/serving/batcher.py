"""Dynamic batching: the images of concurrent requests share model batches.

Each request hands over its decoded images; they wait in one FIFO line, and a single loop takes up to
``max_batch_size`` of them into a batch, waiting at most ``max_wait_ms`` after the oldest one arrived for the batch
to fill. The batch is scored by ``Scorer.predict`` in one model thread (never on the event loop), and every image's
``ImageScore`` goes back to the future of the request that sent it, so a response holds exactly its own images.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


class QueueFullError(Exception):
    """Admitting more images would exceed ``max_queue``; the client should retry later."""


@dataclass
class _Waiting:
    name: str
    pixels: torch.Tensor
    arrived: float
    future: asyncio.Future


class DynamicBatcher:
    """Groups images from concurrent requests into batches of at most ``scorer.batch_size``.

    ``max_queue`` bounds the images admitted at once (being decoded, waiting or being scored): :meth:`admit`
    raises :class:`QueueFullError` beyond it. Start it with :meth:`start` inside the event loop, and :meth:`stop`
    it when the requests are done.
    """

    def __init__(self, scorer, *, max_wait_ms: float = 10.0, max_queue: int = 256):
        self.scorer = scorer
        self.max_batch_size = scorer.batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.admitted = 0
        self.batch_sizes: Counter[int] = Counter()
        self._waiting: deque[_Waiting] = deque()
        self._arrived: asyncio.Event | None = None
        self._busy = False
        self._task: asyncio.Task | None = None
        self._model_thread: ThreadPoolExecutor | None = None

    @contextmanager
    def admit(self, count: int) -> Iterator[None]:
        """Reserve room for ``count`` images until the block ends, or raise :class:`QueueFullError`."""
        if self.admitted + count > self.max_queue:
            raise QueueFullError(
                f"{self.admitted} images are queued; {count} more would exceed the queue of {self.max_queue}"
            )
        self.admitted += count
        try:
            yield
        finally:
            self.admitted -= count

    async def score(self, names: Sequence[str], pixels: Sequence[torch.Tensor]) -> list:
        """``ImageScore`` of each image ([3, 448, 448] pixels), in the given order."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        waiting = [_Waiting(name, image, now, loop.create_future()) for name, image in zip(names, pixels, strict=True)]
        self._waiting.extend(waiting)
        self._arrived.set()
        return list(await asyncio.gather(*(item.future for item in waiting)))

    def start(self) -> None:
        """Start the batching loop in the running event loop."""
        self._arrived = asyncio.Event()
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qscorer-model")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="qscorer-batcher")

    async def stop(self) -> None:
        """Score what is still waiting, then end the loop and the model thread."""
        while self._waiting or self._busy:
            await asyncio.sleep(0.01)
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task
        self._model_thread.shutdown()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [item for item in await self._next_batch() if not item.future.done()]
            if not batch:
                continue
            self._busy = True
            try:
                results = await loop.run_in_executor(self._model_thread, self._score_batch, batch)
            except Exception as error:
                logger.exception("scoring a batch of %d images failed", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
            else:
                self.batch_sizes[len(batch)] += 1
                for item, result in zip(batch, results):
                    if not item.future.done():
                        item.future.set_result(result)
            finally:
                self._busy = False

    async def _next_batch(self) -> list[_Waiting]:
        """Up to ``max_batch_size`` waiting images, once the batch is full or the oldest has waited long enough."""
        loop = asyncio.get_running_loop()
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._waiting[0].arrived + self.max_wait
        while len(self._waiting) < self.max_batch_size and loop.time() < deadline:
            self._arrived.clear()
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
        return [self._waiting.popleft() for _ in range(min(self.max_batch_size, len(self._waiting)))]

    def _score_batch(self, batch: list[_Waiting]) -> list:
        prediction = self.scorer.predict(torch.stack([item.pixels for item in batch]))
        return [self.scorer.image_score(item.name, prediction, row) for row, item in enumerate(batch)]
