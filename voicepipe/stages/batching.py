"""The VAD of every session on one thread, batched across sessions.

A server with N sessions receives a VAD frame from each of them every 32 ms. Run one at a time
from a thread pool, every frame pays the model's whole per-call cost and a thread hand-off, and
the pool's threads compete for the cores with the event loop that carries everybody's audio.
Here one thread takes whatever frames are waiting and runs one frame of each waiting stream per
model call (a stream's next frame needs the state its previous frame left, so a stream with
several frames waiting takes one per call), then hands all the results back to each event loop
in one wake-up. No frame waits for a batch to fill: frames that arrive while a call is running
join the next one, so batches grow with the load and stay at one frame when the server is quiet.

A VAD with `process_batch(streams, frames)` (Silero has it) is called once per batch; any other
VAD is called frame by frame on the same thread, which keeps the ordering and the single thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from voicepipe.stages.base import VAD, VADStream

IDLE_EXIT_S = 10.0  # the thread ends after this long without work and starts again on demand


@dataclass
class _Job:
    stream: VADStream
    frames: np.ndarray  # [k, frame_samples]
    future: asyncio.Future[np.ndarray]
    loop: asyncio.AbstractEventLoop
    probs: np.ndarray = field(init=False)
    next: int = 0
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.probs = np.empty(len(self.frames), np.float32)


class VADBatcher:
    """`await batcher.submit(stream, frames)` gives the speech probability of each frame."""

    def __init__(self, vad: VAD, *, max_batch: int = 128) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.vad = vad
        self.max_batch = max_batch
        self._batch_fn = getattr(vad, "process_batch", None)
        self._cv = threading.Condition()
        self._jobs: list[_Job] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self.calls = 0  # model calls and frames run, for tests and metrics
        self.frames = 0

    def submit(self, stream: VADStream, frames: np.ndarray) -> asyncio.Future[np.ndarray]:
        """Queue `frames` [k, frame_samples] of `stream`; called on an event loop. A stream's
        frames run in the order submitted."""
        n = getattr(self.vad, "frame_samples", None)
        if frames.ndim != 2 or (n is not None and frames.shape[1] != n):
            raise ValueError(f"frames must have shape (k, {n}), got {frames.shape}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        if len(frames) == 0:
            future.set_result(np.empty(0, np.float32))
            return future
        with self._cv:
            if self._closed:
                raise RuntimeError("the VAD batcher is closed")
            self._jobs.append(_Job(stream, frames, future, loop))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vad-batch", daemon=True)
                self._thread.start()
            self._cv.notify()
        return future

    def close(self) -> None:
        """Stop the thread once the frames already queued are done."""
        with self._cv:
            self._closed = True
            thread = self._thread
            self._cv.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._jobs and not self._closed:
                    self._cv.wait(IDLE_EXIT_S)
                if not self._jobs:  # closed, or idle for a while: end; submit starts another
                    self._thread = None
                    return
                jobs, self._jobs = self._jobs, []
            self._deliver(self._work(jobs))

    def _work(self, jobs: list[_Job]) -> list[_Job]:
        waiting: dict[int, deque[_Job]] = {}
        for job in jobs:
            waiting.setdefault(id(job.stream), deque()).append(job)
        done: list[_Job] = []
        while waiting:
            heads = [q[0] for q in waiting.values()][: self.max_batch]
            results = self._call([j.stream for j in heads], [j.frames[j.next] for j in heads])
            for job, result in zip(heads, results, strict=True):
                if isinstance(result, BaseException):  # the rest of that message fails
                    job.error = result
                    job.next = len(job.frames)
                else:
                    job.probs[job.next] = result
                    job.next += 1
                if job.next == len(job.frames):
                    queue = waiting[id(job.stream)]
                    queue.popleft()
                    done.append(job)
                    if not queue:
                        del waiting[id(job.stream)]
        return done

    def _call(self, streams: Sequence[VADStream],
              frames: Sequence[np.ndarray]) -> list[float | BaseException]:
        """One frame of each stream: a probability, or the exception for that stream. A failed
        batched call fails all of its streams' messages; frame by frame, only the one."""
        self.calls += 1
        self.frames += len(frames)
        if self._batch_fn is not None:
            try:
                return [float(p) for p in self._batch_fn(streams, frames)]
            except Exception as exc:
                return [exc] * len(streams)
        out: list[float | BaseException] = []
        for stream, frame in zip(streams, frames, strict=True):
            try:
                out.append(float(stream.process(frame)))
            except Exception as exc:
                out.append(exc)
        return out

    @staticmethod
    def _deliver(done: list[_Job]) -> None:
        by_loop: dict[int, list[_Job]] = {}
        for job in done:
            by_loop.setdefault(id(job.loop), []).append(job)
        for group in by_loop.values():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting
                group[0].loop.call_soon_threadsafe(_settle, group)


def _settle(jobs: list[_Job]) -> None:
    for job in jobs:
        if job.future.done():  # its session went away meanwhile
            continue
        if job.error is not None:
            job.future.set_exception(job.error)
        else:
            job.future.set_result(job.probs)

