"""Where a device's tensor work runs: lanes, the fences that order them, and results the host can take.

A `Lane` is one thread. On a CUDA device it also has its own CUDA stream, made the thread's current
stream when the thread starts (PyTorch's current stream is per thread), so everything the lane
launches runs on its stream; a `Fence` (a CUDA event) recorded on one lane's stream lets another
lane's stream wait for it on the GPU, without blocking either thread. On the CPU the same lanes are
plain threads and fences are no-ops: work is done when the call that did it returns.

`to_host` copies a device tensor into pinned (page-locked) host memory asynchronously, on the
current stream; the copy is complete once a fence recorded after it has been synchronized, and only
then may the host read it. `to_device` is the way back: the host data is staged in pinned memory and
copied asynchronously, so the calling thread does not wait for the work queued on the stream.

Rules the scheduler follows (PyTorch's documented stream semantics):
- a tensor made on one stream and used on another is `record_stream`-ed there (the caching allocator
  would otherwise reuse its memory as soon as it is freed, while the other stream still reads it);
- nothing is read on the host before the fence of the copy that made it has completed;
- CUDA graphs (torch.compile "reduce-overhead") are captured and replayed on the lane thread that runs
  the engine: their state is per thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")

# Post-processing (compositing, copies to the host) is short and on the frames' critical path: its
# stream gets the higher priority, so its kernels are scheduled before the engine's queued ones.
HIGH_PRIORITY = -1


class Lane:
    """One thread running submitted calls in order; on CUDA with its own stream (`stream`).

    device: the device the lane works for. name: the thread's name. priority: its stream's priority
    (CUDA; lower is more urgent). `submit(fn, *args)` -> a concurrent Future of fn(*args);
    `close()` ends the thread after the calls submitted before it (calls submitted after fail)."""

    def __init__(self, device: torch.device, name: str, *, priority: int = 0):
        self.device = torch.device(device)
        self.name = name
        self.stream = torch.cuda.Stream(self.device, priority=priority) if self.device.type == "cuda" else None
        self._calls: queue.SimpleQueue[tuple[Future, Callable, tuple] | None] = queue.SimpleQueue()
        self._closed = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        if self._closed:
            future.set_exception(RuntimeError(f"lane {self.name} is closed"))
            return future
        self._calls.put((future, fn, args))
        return future

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._calls.put(None)

    def _run(self) -> None:
        if self.stream is not None:  # the lane's work runs on its stream
            use_stream(self.stream)
        while True:
            call = self._calls.get()
            if call is None:
                return
            future, fn, args = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 (handed to whoever waits for the call)
                future.set_exception(exc)


def use_stream(stream: torch.cuda.Stream) -> None:
    """Make `stream` (and its device) the calling thread's current one."""
    torch.cuda.set_device(stream.device)
    torch.cuda.set_stream(stream)


class Fence:
    """A point in a stream's work: a CUDA event on a CUDA device, nothing on the CPU.

    `record()` marks the work launched so far on the current stream; `wait()` makes the current
    stream wait for it (on the GPU; the thread goes on); `synchronize()` blocks the thread until it
    has passed; `done()` asks without waiting. timing: the event can measure elapsed time."""

    def __init__(self, device: torch.device, *, timing: bool = False):
        self.event = torch.cuda.Event(enable_timing=timing) if torch.device(device).type == "cuda" else None

    def record(self) -> Fence:
        if self.event is not None:
            self.event.record()
        return self

    def wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def synchronize(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def done(self) -> bool:
        return self.event is None or self.event.query()

    def seconds_until(self, later: Fence) -> float | None:
        """GPU seconds from this fence to `later` (both recorded with timing, `later` passed); None on the CPU."""
        if self.event is None or later.event is None:
            return None
        return self.event.elapsed_time(later.event) / 1000


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of `tensor`: itself when it is on the CPU; else pinned host memory filled by an
    asynchronous copy on the current stream (read it only after a fence recorded after this call has
    been synchronized)."""
    if tensor.device.type == "cpu":
        return tensor
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    out.copy_(tensor, non_blocking=True)
    return out


def to_device(data: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
              ) -> torch.Tensor:
    """Host data as a tensor on `device` (in `dtype` if given). To a CUDA device the data is staged in
    pinned memory and copied asynchronously on the current stream, which orders its later use."""
    tensor = torch.from_numpy(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    else:
        tensor = tensor.to(device)
    return tensor if dtype is None else tensor.to(dtype)


def configure_backends(device: torch.device, *, torch_threads: int | None = None) -> None:
    """The backend flags fast inference wants on `device` (CUDA: cuDNN picks the fastest convolution
    for each shape, which warm-up then measures; float32 matrix work may use TF32; the CPU: torch's
    intra-op threads, `torch_threads` if given, see `Engine.torch_threads`). Process-wide; the server
    and the benchmarks set the same ones, so that the benchmarks measure what the server runs."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif torch_threads is not None:
        torch.set_num_threads(torch_threads)
