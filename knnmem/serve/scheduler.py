"""Admission and concurrency: a bounded queue in front of a fixed number of generation threads.

A request is admitted or refused at once: with every thread busy and `max_queue` requests already
waiting, it is answered 429 instead of waiting without bound; after a shutdown signal, 503. Admitted
requests run in arrival order on worker threads (the model runs outside the event loop, which keeps
answering health checks, metrics and refusals meanwhile). A caller that goes away cancels its job:
waiting, it leaves the queue; running, its `threading.Event` is set and the job stops at its next token.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from .errors import APIError
from .metrics import Metrics

T = TypeVar("T")


class Scheduler:
    """Runs jobs on `workers` threads with at most `max_queue` more waiting; all methods run on the event loop
    (`stop_accepting` may also be called from a signal handler)."""

    def __init__(self, *, workers: int, max_queue: int, metrics: Metrics):
        if workers < 1 or max_queue < 0:
            raise ValueError(f"need at least one worker and a queue of 0 or more, got {workers} and {max_queue}")
        self.workers, self.max_queue, self.metrics = workers, max_queue, metrics
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="knnmem-generate")
        self._slots = asyncio.Semaphore(workers)
        self._admitted = self._running = 0
        self.accepting = True

    def submit(self, job: Callable[[], T], cancel: threading.Event) -> asyncio.Task:
        """Admit `job` and return the task that runs it; `APIError` (429 or 503) at once if it cannot be admitted.

        Cancelling the task cancels the job: `cancel` is set, which the job polls between tokens.
        """
        if not self.accepting:
            self.metrics.rejected.labels("shutting_down").inc()
            raise self._shutting_down()
        if self._admitted >= self.workers + self.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(429, f"the server is busy: {self.workers} requests are generating and {self.max_queue} "
                           "are waiting (--max-queue); retry shortly", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"})
        self._admitted += 1
        self._update()
        return asyncio.create_task(self._run(job, cancel))

    async def _run(self, job: Callable[[], T], cancel: threading.Event) -> T:
        arrived = time.perf_counter()
        try:
            await self._slots.acquire()
        except asyncio.CancelledError:
            self._leave()
            raise
        if not self.accepting:  # queued before a shutdown signal: refused, not started
            self._slots.release()
            self._leave()
            raise self._shutting_down()
        self.metrics.queue_wait.observe(time.perf_counter() - arrived)
        self._running += 1
        self._update()
        future = asyncio.get_running_loop().run_in_executor(self._executor, job)
        # The slot is freed when the thread ends, not when the caller stops waiting: a cancelled job runs on
        # until its next token, and the next job must not start beside it.
        future.add_done_callback(self._finished)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()
            self.metrics.cancelled.inc()
            raise

    def _finished(self, _future) -> None:
        self._running -= 1
        self._slots.release()
        self._leave()

    def _leave(self) -> None:
        self._admitted -= 1
        self._update()

    def _update(self) -> None:
        self.metrics.queue_depth.set(self._admitted - self._running)
        self.metrics.in_flight.set(self._running)

    @staticmethod
    def _shutting_down() -> APIError:
        return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")

    def stop_accepting(self) -> None:
        """Refuse new jobs and those still waiting; running jobs go on."""
        self.accepting = False

    def close(self) -> None:
        """Wait for the running jobs' threads to end (cancel them first to end them soon)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
