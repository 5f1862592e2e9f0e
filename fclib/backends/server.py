"""A real OpenAI-compatible endpoint on loopback: `transformers serve`, started and stopped by fclib.

Offline and in tests the teacher is reached exactly as a remote one would be, over HTTP with
the `openai` client, by serving a local model folder:

    with LocalServer("embedded") as server:
        backend = server.backend(concurrency=8)
        ...

The server listens on a free 127.0.0.1 port, is ready when `/health` answers, and is stopped
by its process id (its whole process group) when the block ends, even on an exception. It also
dies with the process that started it, however that ends (Ctrl-C, SIGTERM, SIGKILL, a kernel
killed with its pipeline): on Linux the kernel sends it SIGKILL then (PR_SET_PDEATHSIG).
With `continuous_batching=True` concurrent requests are generated together (measured in
benchmarks/teacher_concurrency.py); that mode takes its sampling settings from the first
request, ignores per-request seeds and stop strings (the client cuts at them instead).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from fclib.backends.endpoint import OpenAIBackend
from fclib.models import resolve_model


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when the thread that started it ends


def _dies_with(owner: int) -> Any:
    """For `Popen(preexec_fn=...)`: the child is killed when `owner`, the process starting it, ends. Linux only
    (None elsewhere, where the `with` block is the only guard). The owner's thread must outlive the server: it
    is started from the thread that runs the notebook's cells."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: nothing is loaded after it

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != owner:  # the owner ended between the fork and prctl
            os._exit(1)

    return in_child


class LocalServer:
    """`transformers serve MODEL_DIR` on a free loopback port, for the life of a `with` block."""

    def __init__(
        self,
        model: str = "embedded",
        continuous_batching: bool = False,
        startup_timeout: float = 300.0,
        log_path: str | Path | None = None,
    ):

        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.model_dir = str(resolve_model(model))
        if not Path(self.model_dir).is_dir():
            raise ValueError(f"transformers serve needs a local model folder here (offline); {model!r} is not one")
        self.continuous_batching = continuous_batching
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="fclib-serve-")) / "server.log"

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server is not started")
        return f"http://127.0.0.1:{self.port}/v1"

    def backend(self, **kwargs: Any) -> OpenAIBackend:
        """An OpenAI client backend for this server (sampling sent the way this server reads it)."""
        return OpenAIBackend(self.base_url, self.model_dir, hf_sampling=True, **kwargs)

    def start(self) -> LocalServer:
        if self.process is not None:
            return self
        self.port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "transformers.cli.transformers",
            "serve",
            self.model_dir,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        if self.continuous_batching:
            cmd.append("--continuous-batching")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C in a terminal reaches its owner, which stops it in order
                preexec_fn=_dies_with(os.getpid()),
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if json.loads(r.read()).get("status") == "ok":
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"transformers serve did not answer /health within {self.startup_timeout:.0f}s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the server and everything it started, by process group id."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __del__(self) -> None:  # a forgotten server must not outlive its owner
        self.stop()
