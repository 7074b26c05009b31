"""What the `lipstream` command logs: its own messages, and third-party noise only when asked (-v).

Quiet (the default): lipstream's loggers at INFO, everyone else's at WARNING; Python warnings raised
inside the heavy libraries (torch, diffusers, transformers, MediaPipe, protobuf) hidden; and the lines
their native code writes straight to the process's stderr (MediaPipe's and TensorFlow Lite's glog/absl
lines such as `W0000 00:00:... inference_feedback_manager.cc:114] ...`, "INFO: Created TensorFlow
Lite XNNPACK delegate", absl's "All log messages before absl::InitializeLog()...") dropped by
`NativeStderrFilter`.
Verbose: everything at DEBUG, nothing filtered."""

from __future__ import annotations

import logging
import os
import re
import select
import signal
import sys
import threading
import warnings

FORMAT = "%(levelname)s %(name)s: %(message)s"
NOISY_PACKAGES = r"(torch|torchvision|diffusers|transformers|huggingface_hub|mediapipe|google\.protobuf|absl)(\.|$)"
# One line of native log output, matched from its start to its newline.
NATIVE_NOISE = re.compile(
    rb"(?:[IW]\d{4} [\d:.]+ +\d+ [\w./-]+:\d+\] "  # absl/glog INFO and WARNING lines
    rb"|INFO: Created TensorFlow Lite "
    rb"|WARNING: All log messages before absl::InitializeLog\(\) )[^\n]*\n")
# Where such a line may begin, in output whose newline has not come yet (a line can arrive in pieces).
NOISE_START = re.compile(rb"[IW]\d{4} |INFO: |WARNING: All log")
HOLD_S = 0.2  # text held as a possible noise line is passed on if no newline comes this soon


def configure(verbose: bool) -> NativeStderrFilter | None:
    """Set up logging for a command; returns the native filter to `close()` at exit (None when verbose)."""
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format=FORMAT)
        return None
    logging.basicConfig(level=logging.WARNING, format=FORMAT)
    logging.getLogger("lipstream").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", module=NOISY_PACKAGES)
    try:
        return NativeStderrFilter()
    except OSError:  # no stderr to route (closed): nothing to filter either
        return None


class NativeStderrFilter:
    """Routes file descriptor 2 through a pipe and a thread that writes everything on to the real
    stderr except `NATIVE_NOISE` lines. Python's own stderr output (tracebacks, progress bars, log
    records) passes unchanged and at once; only whole noise lines are dropped."""

    def __init__(self, fd: int = 2):
        self.fd = fd
        sys.stderr.flush()
        self._target = os.dup(fd)
        read, write = os.pipe()
        os.dup2(write, fd)
        os.close(write)
        self._read = read
        self._thread = threading.Thread(target=self._forward, name="lipstream-stderr", daemon=True)
        self._thread.start()
        self._previous_handler = None
        if threading.current_thread() is threading.main_thread():  # SIGTERM's default ends the process at
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)  # once: pass on the rest

    def _on_sigterm(self, signum: int, frame) -> None:
        self.close()
        signal.raise_signal(signum)  # now with the handler there was before

    def _forward(self) -> None:
        read = self._read
        held = b""  # the start of a line that may be noise, until its newline comes
        while True:
            if held and not select.select([read], [], [], HOLD_S)[0]:
                os.write(self._target, held)  # no newline came: it was not a native log line
                held = b""
                continue
            chunk = os.read(read, 1 << 16)
            if not chunk:
                break
            data = held + chunk
            lines_end = data.rfind(b"\n") + 1
            out, tail = NATIVE_NOISE.sub(b"", data[:lines_end]), data[lines_end:]
            start = NOISE_START.search(tail)
            held = tail[start.start():] if start else b""
            out += tail[:start.start()] if start else tail
            if out:
                os.write(self._target, out)
        if held:
            os.write(self._target, held)
        os.close(read)

    def close(self, timeout_s: float = 2.0) -> None:
        """Put the real stderr back and pass on what is still in the pipe (idempotent)."""
        if self._read is None:
            return
        if self._previous_handler is not None and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous_handler)
        try:
            sys.stderr.flush()
        except ValueError:  # stderr closed already
            pass
        os.dup2(self._target, self.fd)  # closes our write end: the thread sees the end of the pipe
        self._thread.join(timeout_s)
        if not self._thread.is_alive():  # (a child process still holding the pipe keeps it open)
            os.close(self._target)
        self._read = None
