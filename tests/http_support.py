"""HTTP service subprocesses for tests (Flower, the example web app): ports, output, readiness."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import httpx

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def free_port() -> int:
    """A loopback port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    probe: Callable[[], T | None], *, timeout_s: float, interval_s: float = 0.1, what: str
) -> T:
    """Poll ``probe`` until it returns something other than None; bounded by ``timeout_s``."""
    ends = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() >= ends:
            raise TimeoutError(f"{what}: not within {timeout_s}s")
        time.sleep(interval_s)


class ServiceProcess:
    """A subprocess whose combined output is collected for diagnosis."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self.on_line(line)

    def on_line(self, line: str) -> None:
        """Called (in the reader thread) for each line of output."""

    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        """SIGKILL: the process dies with its connections open, as in a crash."""
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def answers(url: str, *, auth: tuple[str, str] | None = None) -> bool:
    """True when ``url`` answers 200."""
    try:
        return httpx.get(url, auth=auth, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def running_service(
    cmd: Sequence[str], env: Mapping[str, str], *, ready_url: str, name: str, timeout_s: float = 30
) -> Iterator[ServiceProcess]:
    """Start ``cmd`` in the repository root and wait until ``ready_url`` answers 200."""
    proc = subprocess.Popen(
        list(cmd),
        cwd=ROOT,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    service = ServiceProcess(proc)
    try:

        def ready() -> bool | None:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{service.output()}")
            return True if answers(ready_url) else None

        try:
            wait_for(ready, timeout_s=timeout_s, interval_s=0.2, what=f"{name} at {ready_url}")
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\n{service.output()}") from exc
        yield service
    finally:
        service.stop()
