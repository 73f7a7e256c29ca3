"""The serving engine: one model per process, a bounded queue, one scheduler thread.

Requests wait in a bounded queue (a full queue is a 429). One worker thread owns the model
and a `senab.generation.DecodeBatch`: at every step boundary it admits queued requests
(prefilled, then joined to the batch) up to `max_batch_size` sequences, and runs one
decode step for all of them; finished and cancelled sequences leave at once. Text deltas
cross from the worker thread to each request's event loop through an `asyncio.Queue`.

The worker is the only thread that runs PyTorch with more than one intra-op thread (see
`keep_main_thread_serial`).

NOTE: a prefill runs between two decode steps, so the running streams pause while a long
prompt is prefilled (no chunked prefill).
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
import torch

from app.errors import ModelUnavailable, QueueFull
from app.metrics import Metrics
from senab.bridge import BridgeHandle, Checkpoint, attach_bridge
from senab.generation import DecodeBatch, GenerationRequest, Generator, RowOutput
from senab.prefix import PrefixCache, PrefixStats

logger = logging.getLogger(__name__)

# Intra-op threads for decoding: PyTorch's default (the cores, or OMP_NUM_THREADS), read
# before anything lowers it.
DECODE_THREADS = torch.get_num_threads()


def keep_main_thread_serial() -> None:
    """Give the calling thread one intra-op thread; call it before loading the model.

    PyTorch's CPU kernels run on OpenMP, and libgomp gives each thread that starts a
    parallel region its own team of workers. Once the main thread had a team (from loading
    the model), the worker thread's parallel regions ran about half as fast on a 2-core
    machine: 24-32 against 44-51 tokens/s for one int4 stream, with nothing else running.
    With one thread the main thread never starts a team, and the worker sets
    DECODE_THREADS for itself when it starts.
    """
    torch.set_num_threads(1)


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
    weights: str = "dense weights"  # how the linear layers are held, from senab.quant
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


def _emit_all(items: list[tuple[Job, RowOutput]]) -> None:
    """Hand a step's outputs to their jobs with one wake-up per event loop, not one per job.

    Each `call_soon_threadsafe` writes to the loop's self-pipe and takes the GIL from the
    decode thread once more.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, RowOutput]]] = {}
    for job, output in items:
        by_loop.setdefault(job.loop, []).append((job, output))
    for loop, loop_items in by_loop.items():
        loop.call_soon_threadsafe(_put_all, loop_items)


def _put_all(items: list[tuple[Job, RowOutput]]) -> None:
    for job, output in items:
        job.events.put_nowait(output)


class Engine:
    """Owns the model and the worker thread that decodes queued jobs."""

    def __init__(self, served: ServedModel, *, max_queue: int = 64, max_batch_size: int = 16,
                 metrics: Metrics | None = None, prefix_cache_bytes: int = 0) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.served = served
        self.max_batch_size = max_batch_size
        self.metrics = metrics or Metrics()
        self._running = 0
        prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        self.generator = Generator(served.model, served.tokenizer, served.handle, prefix_cache=prefix_cache)
        if prefix_cache is None:
            logger.info("prompt prefixes are not cached: SENAB_PREFIX_CACHE_MB is 0")
        elif (problem := self.generator.prefix_blocker()) is not None:
            logger.info("prompt prefixes are not cached: %s", problem)
        else:
            logger.info("prompt prefixes of %d tokens or more are cached below the bridge, up to %d MiB",
                        prefix_cache.min_tokens, prefix_cache_bytes >> 20)
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._worker: threading.Thread | None = None
        self._stopping = threading.Event()
        self._retry_after_s = 1

    def start(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="senab-engine", daemon=True)
            self._worker.start()
            logger.info("engine started: model %s, batches of up to %d sequences, queue size %d",
                        self.served.name, self.max_batch_size, self._queue.maxsize)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running sequences (nothing of them is committed), reject the queued
        ones with 503, and wait up to `timeout` seconds for the worker to exit."""
        if self._worker is None:
            return
        self._stopping.set()
        try:
            self._queue.put_nowait(None)  # wakes a worker waiting on an empty queue
        except queue.Full:
            pass  # with a full queue the worker is not waiting, and it reads the flag at its next step
        self._worker.join(timeout)
        if self._worker.is_alive():
            logger.warning("engine worker did not stop within %.0f s", timeout)
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

    @property
    def running(self) -> int:
        """Sequences being decoded now."""
        return self._running

    def prefix_stats(self) -> PrefixStats | None:
        """Return the prefix cache's counts, or None where prompts are not cached."""
        cache = self.generator.prefix_cache
        return None if cache is None or self.generator.prefix_prefill is None else cache.stats

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
        torch.set_num_threads(DECODE_THREADS)
        batch = DecodeBatch(self.generator)
        jobs: dict[int, Job] = {}  # output index -> job, for the rows in the batch
        next_index = 0
        stopping = False

        def should_cancel(index: int) -> bool:
            job = jobs[index]
            return stopping or job.cancelled.is_set() or time.monotonic() > job.deadline

        while True:
            stopping = stopping or self._stopping.is_set()
            admitted = self._admit(block=not batch and not stopping, room=self.max_batch_size - len(batch))
            if admitted is None:
                stopping = True
                admitted = []
            if stopping and not batch:
                self._reject_all(admitted)
                return
            admitted = [job for job in admitted if not job.cancelled.is_set()]
            if admitted:
                indices = list(range(next_index, next_index + len(admitted)))
                next_index += len(admitted)
                try:
                    batch.add([job.request for job in admitted], indices)
                except Exception as exc:  # one bad request must not stop the engine
                    logger.exception("requests %s failed in prefill",
                                     ", ".join(job.request_id for job in admitted))
                    for job in admitted:
                        job._emit(exc)
                else:
                    jobs.update(zip(indices, admitted))
                    logger.debug("prefilled requests %s; %d sequences running",
                                 ", ".join(job.request_id for job in admitted), len(batch))
            if not batch:
                continue

            self._running = len(batch)
            self.metrics.batch_size.observe(len(batch))
            # Tokens go out before the forward call that computes the next ones, so a
            # stream receives each token one forward call earlier than after a whole step.
            try:
                outputs = batch.sample(should_cancel)
            except Exception as exc:
                self._fail(batch, jobs, exc)
                outputs = []
            delivered: list[tuple[Job, RowOutput]] = []
            for output in outputs:
                job = jobs[output.index]
                delivered.append((job, output))
                if output.finish_reason is not None:
                    del jobs[output.index]
                    logger.debug("request %s finished (%s) after %d tokens", job.request_id,
                                 output.finish_reason, output.completion_tokens)
            _emit_all(delivered)
            try:
                batch.forward()
            except Exception as exc:
                self._fail(batch, jobs, exc)
            self._running = len(batch)

    @staticmethod
    def _fail(batch: DecodeBatch, jobs: dict[int, Job], exc: Exception) -> None:
        """End every row of `batch` with `exc`, after a failed decode step."""
        failed = batch.abort()
        logger.exception("decode step failed; ending requests %s", ", ".join(jobs[i].request_id for i in failed),
                         exc_info=exc)
        for index in failed:
            jobs.pop(index)._emit(exc)

    def _admit(self, *, block: bool, room: int) -> list[Job] | None:
        """Take up to `room` queued jobs (waiting for one when `block`); None means stop."""
        admitted: list[Job] = []
        while len(admitted) < room:
            try:
                job = self._queue.get() if block and not admitted else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._reject_all(admitted)
                return None
            admitted.append(job)
        return admitted

    def _reject_all(self, jobs: list[Job]) -> None:
        """Reject `jobs` and everything still queued with 503, because the engine is stopping."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                jobs.append(job)
        for job in jobs:
            job._emit(ModelUnavailable("The server is shutting down; retry on another replica."))
