"""The serving engine: one model per process, a bounded queue, one decode worker.

Requests wait in a bounded queue (a full queue is a 429) and a single worker thread runs
them through `senab.generation.Generator`, one request at a time. Text deltas cross from
the worker thread to the request's event loop through an `asyncio.Queue`.

NOTE: requests run one after another, so aggregate throughput does not grow with
concurrent streams. Continuous batching (new sequences joining the decode batch at step
boundaries) is not implemented yet.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import numpy as np

from app.errors import ModelUnavailable, QueueFull
from senab.bridge import BridgeHandle, Checkpoint, attach_bridge
from senab.generation import GenerationRequest, Generator, RowOutput

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """A loaded base model with its bridge checkpoint attached."""

    model: object
    tokenizer: object
    name: str
    context_length: int
    checkpoint: Checkpoint
    device: str = "cpu"
    dtype: str = "float32"
    handle: BridgeHandle = field(init=False)

    def __post_init__(self) -> None:
        self.handle = attach_bridge(self.model, self.checkpoint.bridge)

    @property
    def senab_name(self) -> str:
        return f"{self.name}+senab"

    @property
    def set_point(self) -> np.ndarray:
        return self.checkpoint.bridge.set_point.detach().float().cpu().numpy()


class Job:
    """One request in the engine: its input, its output queue and its cancel flag."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, request_id: str,
                 deadline: float) -> None:
        self.request = request
        self.loop = loop
        self.request_id = request_id
        self.deadline = deadline
        self.events: asyncio.Queue[RowOutput | BaseException] = asyncio.Queue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def _emit(self, item: RowOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    async def stream(self) -> AsyncIterator[RowOutput]:
        """Yield outputs until the one that finishes; re-raise a worker error here."""
        while True:
            item = await self.events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return


class Engine:
    """Owns the model and the worker thread that decodes queued jobs."""

    def __init__(self, served: ServedModel, *, max_queue: int = 64) -> None:
        self.served = served
        self.generator = Generator(served.model, served.tokenizer, served.handle)
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._worker: threading.Thread | None = None
        self._retry_after_s = 1

    def start(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="senab-engine", daemon=True)
            self._worker.start()
            logger.info("engine started: model %s, queue size %d", self.served.name, self._queue.maxsize)

    def stop(self, timeout: float = 10.0) -> None:
        if self._worker is None:
            return
        self._queue.put(None)
        self._worker.join(timeout)
        self._worker = None
        logger.info("engine stopped")

    @property
    def ready(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    @property
    def max_queue(self) -> int:
        return self._queue.maxsize

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, request: GenerationRequest, *, request_id: str, timeout_s: float) -> Job:
        """Queue a request; raise QueueFull (429) when the queue is at its limit."""
        if not self.ready:
            raise ModelUnavailable("The model is not loaded yet; retry shortly.")
        job = Job(request, asyncio.get_running_loop(), request_id, time.monotonic() + timeout_s)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(
                f"The request queue is full ({self._queue.maxsize} waiting); retry after "
                f"{self._retry_after_s} s.", headers={"Retry-After": str(self._retry_after_s)},
            ) from None
        return job

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            started = time.monotonic()
            try:
                def should_cancel(_: int, job: Job = job) -> bool:
                    return job.cancelled.is_set() or time.monotonic() > job.deadline

                for outputs in self.generator.stream([job.request], should_cancel=should_cancel):
                    for output in outputs:
                        job._emit(output)
            except Exception as exc:  # the worker must survive one bad request
                logger.exception("request %s failed in the engine", job.request_id)
                job._emit(exc)
            else:
                logger.debug("request %s decoded in %.3f s", job.request_id, time.monotonic() - started)
