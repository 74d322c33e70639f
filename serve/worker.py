"""The work behind dit-serve: per model, a bounded set of admitted requests, run a unit at a time, in turn.

Admission: at most `concurrency + queue_size` requests per model are admitted (running or waiting); one more is
refused at once with an estimate of when to retry (QueueFull), before any work is done for it.
Fairness: a request of n images is split into units of at most `max_batch` images, each one Pipeline call with
the seeds a single batch would use (image i: seed + i), so the split never changes an image. Worker threads take
units from the admitted requests in turn (round-robin; a request runs one unit at a time and rejoins the turns
when it ends), so a request arriving behind a large one waits for at most the unit of it that runs, not for all
of it. With several workers, different requests run at once; one request's images share a unit (max_batch).
Cancellation: `cancel` is seen by a running unit at its next step (on_step raises Cancelled); units not yet
started never run. A request past its deadline is cancelled the same way.
"""

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ditrt.runtime.pipeline import Pipeline, to_uint8


class Cancelled(Exception):
    """A request stopped before it was done; reason: client, timeout, deleted or shutdown."""

    def __init__(self, reason: str):
        super().__init__(f"cancelled ({reason})")
        self.reason = reason


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"queue full, retry after {retry_after} s")
        self.retry_after = retry_after


class Closed(Exception):
    """The worker is shutting down and admits nothing more."""


@dataclass(eq=False)
class Job:
    """One request: its checked Pipeline arguments and where its results go.

    sink(event) is called from worker threads with ("preview", image, index, payload), ("image", image, payload)
    and finally ("done", None) or ("error", exception); encode(image, parameters) -> payload (e.g. base64 PNG).
    """

    args: (
        dict  # Pipeline keyword arguments but seed and batch_size: prompt or class_label, steps, guidance...
    )
    n: int
    seed: int
    preview_steps: tuple[int, ...]
    deadline: float  # time.monotonic()
    sink: Callable[[tuple], None]
    encode: Callable[[np.ndarray, str | None], str]
    reason: str | None = None  # why it was cancelled, once it was
    # filled in as units finish (read by the caller after "done")
    parameters: dict[int, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    # scheduling state, under the worker's lock
    next: int = 0  # first image not yet given to a unit
    running: bool = False  # a unit of it runs now (one at a time: see the module docstring)
    done: int = 0  # images finished
    finished: bool = False
    admitted: float = field(default_factory=time.perf_counter)
    started: float | None = None

    def units_left(self, max_batch: int) -> int:
        return math.ceil((self.n - self.next) / max_batch)


class ModelWorker:
    """The admitted requests of one model and the threads that run them (see the module docstring)."""

    def __init__(self, name: str, pipe: Pipeline, metrics, concurrency: int, queue_size: int, max_batch: int):
        self.name, self.pipe, self.metrics = name, pipe, metrics
        self.concurrency, self.capacity, self.max_batch = concurrency, concurrency + queue_size, max_batch
        self.lock = threading.Condition()
        self.turns: deque[Job] = deque()  # admitted requests with units not yet started, in turn order
        self.active: set[Job] = set()  # admitted requests not finished
        self.unit_s = 1.0  # running mean of a unit's seconds, for Retry-After
        self.closing = False
        self.threads = [
            threading.Thread(target=self._serve, name=f"dit-serve-{name}-{i}", daemon=True)
            for i in range(concurrency)
        ]
        metrics.queue_depth.labels(name).set_function(lambda: self._count(running=False))
        metrics.in_flight.labels(name).set_function(lambda: self._count(running=True))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def alive(self) -> bool:
        return all(t.is_alive() for t in self.threads)

    def _count(self, running: bool) -> int:
        with self.lock:
            return sum(1 for j in self.active if j.running == running)

    def submit(self, job: Job) -> None:
        """Admit the request or refuse it at once: QueueFull (with seconds to wait), Closed."""
        with self.lock:
            if self.closing:
                raise Closed()
            if len(self.active) >= self.capacity:
                waiting = sum(j.units_left(self.max_batch) + j.running for j in self.active)
                raise QueueFull(max(1, min(3600, math.ceil(waiting * self.unit_s / self.concurrency))))
            self.active.add(job)
            self.turns.append(job)
            self.lock.notify()

    def cancel(self, job: Job, reason: str) -> None:
        """Stop the request: at once if no unit of it runs, else at the running unit's next step."""
        with self.lock:
            if job.finished:
                return
            job.reason = job.reason or reason
            if not job.running:
                self._finish(job, Cancelled(job.reason))

    def cancel_all(self, reason: str) -> None:
        """Admit nothing more and stop every admitted request (shutdown past its deadline)."""
        with self.lock:
            self.closing = True
            for job in list(self.active):
                job.reason = job.reason or reason
                if not job.running:
                    self._finish(job, Cancelled(job.reason))
            self.lock.notify_all()

    def close(self, deadline_s: float) -> None:
        """Admit nothing more; let the admitted requests finish within deadline_s, then cancel them."""
        with self.lock:
            self.closing = True
            self.lock.notify_all()
        end = time.monotonic() + deadline_s
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        self.cancel_all("shutdown")
        for t in self.threads:  # a running unit stops at its next step
            t.join()

    def _serve(self) -> None:
        while True:
            with self.lock:
                while not self.turns and not (self.closing and not self.active):
                    self.lock.wait()
                if not self.turns:
                    return
                job = self.turns.popleft()
                start, k = job.next, min(self.max_batch, job.n - job.next)
                job.next += k
                job.running = True
                if job.started is None:
                    job.started = time.perf_counter()
                    self.metrics.stage.labels(self.name, "queue").observe(job.started - job.admitted)
                    job.timings_ms["queue"] = (job.started - job.admitted) * 1e3
            error, t0 = None, time.perf_counter()
            try:
                if job.reason is None and time.monotonic() > job.deadline:
                    job.reason = "timeout"
                if job.reason is not None:
                    raise Cancelled(job.reason)
                self._unit(job, start, k)
            except Exception as e:
                error = e
            with self.lock:
                job.running = False
                if error is None:
                    job.done += k
                    self.unit_s = 0.8 * self.unit_s + 0.2 * (time.perf_counter() - t0)
                if error is None and job.done == job.n:
                    self._finish(job, None)  # done, even if a cancel came after its last step
                elif error is not None or job.reason is not None:
                    self._finish(job, error or Cancelled(job.reason))
                else:  # its next unit after the turns of the requests that came meanwhile
                    self.turns.append(job)
                    self.lock.notify()

    def _finish(self, job: Job, error: Exception | None) -> None:
        """Under the lock, with no unit of the request running: it leaves, its last event goes out."""
        if job in self.turns:
            self.turns.remove(job)
        job.finished = True
        self.active.discard(job)
        self.lock.notify_all()  # an idle thread waiting for the last request to finish, at shutdown
        if isinstance(error, Cancelled):
            self.metrics.cancelled.labels(self.name, error.reason).inc()
        job.sink(("done", None) if error is None else ("error", error))

    def _unit(self, job: Job, start: int, k: int) -> None:
        """Images start..start+k-1 of the request: one Pipeline call, its previews and images to the sink."""
        steps_counter = self.metrics.steps.labels(self.name)

        def on_step(i: int, steps: int) -> None:
            steps_counter.inc()
            if job.reason is None and time.monotonic() > job.deadline:
                job.reason = "timeout"
            if job.reason is not None:
                raise Cancelled(job.reason)

        def on_preview(step: int, x0: np.ndarray) -> None:
            for j, image in enumerate(to_uint8(self.pipe.decode(x0))):
                job.sink(("preview", start + j, job.preview_steps.index(step), job.encode(image, None)))

        result = self.pipe(
            **job.args,
            seed=job.seed + start,
            batch_size=k,
            on_step=on_step,
            on_preview=on_preview if job.preview_steps else None,
            preview_steps=job.preview_steps,
        )
        t = time.perf_counter()
        payloads = [job.encode(image, p) for image, p in zip(result.images, result.parameters)]
        stages = {
            "text_encode": result.timings_ms["text_encode"],
            "denoise": result.timings_ms["denoise_total"],
            "decode": result.timings_ms["decode"],
            "encode": (time.perf_counter() - t) * 1e3,
        }
        for stage, ms in stages.items():
            self.metrics.stage.labels(self.name, stage).observe(ms / 1e3)
        self.metrics.images.labels(self.name).inc(k)
        with self.lock:
            for stage, ms in stages.items():
                job.timings_ms[stage] = job.timings_ms.get(stage, 0.0) + ms
            job.warnings.extend(w for w in result.warnings if w not in job.warnings)
            for j, params in enumerate(result.parameters):
                job.parameters[start + j] = params
        for j, payload in enumerate(payloads):
            job.sink(("image", start + j, payload))
