"""The processes a scenario runs against, all its own, all stopped at the end.

* :class:`RedisServer`: a ``redis-server`` on a free port (never 6379), optionally with an
  append-only file (``--appendonly yes --appendfsync always``) in a directory of its own,
  so that it can be SIGKILLed, shut down and started again with its data.
* :class:`MockUpstream`: ``python -m worker.mockllm --port N --scenarios FILE``.
* :class:`Workers`: Celery workers started from the Procfile's ``worker`` line (its pool,
  prefetch and events; the concurrency stated; a hostname of their own). A supervisor
  thread replaces a worker that exits without being told to, as an orchestrator would, and
  records the exit: an unexpected exit fails the scenario.
* :class:`Rig`: one scenario's stack of the three, with its key prefix, queue and agents.

Every process runs in a process group of its own and is stopped by its group id only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 60.0
"""A worker's start on a loaded 2-core machine (imports, broker, mingle)."""
SUPERVISE_INTERVAL_S = 0.25


def free_port() -> int:
    """A loopback port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str | None:
    """The ``redis-server`` on PATH, if any."""
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """``VmRSS`` (or ``VmHWM``, its peak so far) of ``pid`` in MB; 0 when it is gone."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Proc:
    """A subprocess in a process group of its own, its output in ``log_path``."""

    def __init__(
        self, name: str, cmd: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        self.expected_exit = False
        """Set when the harness stops or kills it: its exit is then not a failure."""
        self.started_at = time.time()
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(
            self.cmd,
            cwd=ROOT,
            env=dict(env) if env is not None else None,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, since: int = 0) -> str:
        """The output from byte ``since`` on (all of it by default)."""
        with self.log_path.open("rb") as log:
            log.seek(since)
            return log.read().decode("utf-8", errors="replace")

    def size(self) -> int:
        """How many bytes of output so far (for :meth:`output`'s ``since``)."""
        return self.log_path.stat().st_size

    def tail(self, lines: int = 30) -> list[str]:
        return self.output().splitlines()[-lines:]

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process's group while its leader is not reaped (its id cannot
        have gone to another process); nothing once it is."""
        if self.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)

    def wait_for(self, text: str, timeout_s: float) -> None:
        """Wait until ``text`` appears in the output.

        Raises:
            RuntimeError: the process exited first, or ``timeout_s`` passed.
        """
        ends = time.monotonic() + timeout_s
        while time.monotonic() < ends:
            if text in self.output():
                return
            if not self.alive():
                break
            time.sleep(0.05)
        tail = "\n".join(self.tail(40))
        raise RuntimeError(f"{self.name}: no {text!r} within {timeout_s}s:\n{tail}")

    def kill(self) -> None:
        """SIGKILL: the process dies with its connections open, as in a crash."""
        self.expected_exit = True
        self.signal(signal.SIGKILL)
        self.popen.wait(timeout=10)
        self._log.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (after SIGCONT, should it be stopped), SIGKILL after ``timeout_s``."""
        self.expected_exit = True
        if self.alive():
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(timeout=10)
        self._log.close()


class RedisServer:
    """A ``redis-server`` of the scenario's own, on a free port.

    Args:
        log_dir: where its logs and (``aof``) its data directory go.
        aof: persist every write to an append-only file, fsynced on each (so that a
            SIGKILL loses nothing that was acknowledged) and loaded again on restart.
    """

    def __init__(self, log_dir: Path, *, aof: bool = False) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self._binary = binary
        self.port = free_port()
        self.aof = aof
        self.log_dir = log_dir
        self.data_dir = log_dir / f"redis-{self.port}-data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc: Proc | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **options: Any) -> redis.Redis:
        defaults: dict[str, Any] = {"socket_timeout": 10.0, "socket_connect_timeout": 2.0}
        return redis.Redis.from_url(self.url, **{**defaults, **options})

    def start(self) -> None:
        """Start it (again, on the same port and data) and wait until it answers."""
        self.starts += 1
        cmd = [
            self._binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--dir", str(self.data_dir), "--daemonize", "no",
            "--appendonly", "yes" if self.aof else "no", "--appendfsync", "always",
        ]  # fmt: skip
        log_path = self.log_dir / f"redis-{self.port}-{self.starts}.log"
        self.proc = Proc(f"redis-{self.starts}", cmd, log_path)
        client = self.client(socket_timeout=1.0)
        ends = time.monotonic() + 30
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.BusyLoadingError:
                    pass
                except redis.ConnectionError:
                    if not self.proc.alive():
                        raise RuntimeError(
                            f"redis-server exited:\n{self.proc.output()[-2000:]}"
                        ) from None
                if time.monotonic() > ends:
                    raise RuntimeError(f"redis-server on {self.port} did not answer in 30 s")
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL the server."""
        assert self.proc is not None
        self.proc.kill()

    def shutdown(self) -> None:
        """``SHUTDOWN``: the server writes its append-only file, closes every client, exits."""
        assert self.proc is not None
        self.proc.expected_exit = True
        client = self.client()
        try:
            client.shutdown()
        finally:
            client.close()
        self.proc.popen.wait(timeout=30)
        self.proc.stop()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


class MockUpstream:
    """``python -m worker.mockllm`` in its own process, scripted per model name."""

    def __init__(self, log_dir: Path, scenarios: Mapping[str, Sequence[Mapping[str, Any]]]):
        self.port = free_port()
        path = log_dir / f"mockllm-{self.port}-scenarios.json"
        path.write_text(json.dumps({k: list(v) for k, v in scenarios.items()}), encoding="utf-8")
        cmd = [sys.executable, "-m", "worker.mockllm", "--port", str(self.port)]
        self.proc = Proc("mockllm", [*cmd, "--scenarios", str(path)], log_dir / "mockllm.log")
        try:
            self.proc.wait_for("listening", 30)
        except BaseException:
            self.proc.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, model: str, steps: Sequence[Mapping[str, Any]]) -> None:
        """Answer the next requests for ``model`` with ``steps`` (the last one repeats)."""
        response = httpx.put(
            f"{self.url}/_mock/scenarios/{model}", json={"steps": list(steps)}, timeout=30
        )
        response.raise_for_status()

    def stop(self) -> None:
        self.proc.stop()


def procfile_worker_command(concurrency: int) -> list[str]:
    """The Procfile's ``worker`` line, with ``concurrency`` for ``$RELIEVER_CONCURRENCY``.

    ``celery`` becomes this interpreter's ``-m celery``, so that the line runs in this
    virtualenv.
    """
    for line in (ROOT / "Procfile").read_text(encoding="utf-8").splitlines():
        if line.startswith("worker:"):
            text = re.sub(r"\$\{RELIEVER_CONCURRENCY:-\d+\}", str(concurrency), line[7:])
            words = shlex.split(text)
            if words[:1] != ["celery"] or any("$" in w for w in words):
                raise RuntimeError(f"Procfile: cannot run the worker line {line!r}")
            return [sys.executable, "-m", "celery", *words[1:]]
    raise RuntimeError("Procfile: no worker line")


@dataclass
class WorkerExit:
    """A worker that exited without the harness telling it to."""

    name: str
    pid: int
    returncode: int | None
    at: float
    tail: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "returncode": self.returncode,
            "at": self.at,
            "tail": self.tail,
        }


class Workers:
    """The scenario's worker processes; a supervisor keeps ``count`` of them running.

    A worker that exits on its own is recorded (:attr:`exits`) and replaced by a new one,
    as an orchestrator would: the jobs behind it go on being measured.
    """

    def __init__(
        self, log_dir: Path, env: Mapping[str, str], *, concurrency: int, count: int = 2
    ) -> None:
        self.log_dir = log_dir
        self.env = dict(env)
        self.concurrency = concurrency
        self.count = count
        self.procs: list[Proc] = []
        self.exits: list[WorkerExit] = []
        self.replaced: list[tuple[str, float]] = []
        """(name of the new worker, seconds from the exit until it was ready)."""
        self._made = 0
        self._missing = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _spawn(self, env: Mapping[str, str] | None = None) -> Proc:
        with self._lock:
            self._made += 1
            name = f"w{self._made}"
            cmd = procfile_worker_command(self.concurrency)
            cmd += ["--hostname", f"chaos-{name}-{uuid.uuid4().hex[:6]}@%h"]
            proc = Proc(name, cmd, self.log_dir / f"worker-{name}.log", {**self.env, **(env or {})})
            self.procs.append(proc)
            return proc

    def start(self, n: int | None = None, env: Mapping[str, str] | None = None) -> list[Proc]:
        """Start ``n`` workers (all that are missing when None) and wait until they consume."""
        with self._lock:
            missing = self.count - len(self.live()) if n is None else n
            new = [self._spawn(env) for _ in range(missing)]
        for proc in new:
            proc.wait_for(" ready.", READY_TIMEOUT_S)
        return new

    def live(self) -> list[Proc]:
        with self._lock:
            return [p for p in self.procs if p.alive()]

    def kill(self, proc: Proc) -> None:
        proc.kill()

    def supervise(self) -> None:
        """Start the supervisor thread."""
        self._thread = threading.Thread(target=self._loop, name="chaos-supervisor", daemon=True)
        self._thread.start()

    def notice(self) -> int:
        """Record the workers that exited on their own since the last look; how many."""
        with self._lock:
            gone = [p for p in self.procs if not p.alive() and not p.expected_exit]
            for proc in gone:
                proc.expected_exit = True  # recorded once
                self.exits.append(
                    WorkerExit(
                        proc.name, proc.pid, proc.popen.returncode, time.time(), proc.tail(25)
                    )
                )
                self._missing += 1
        return len(gone)

    def _loop(self) -> None:
        while not self._stop.wait(SUPERVISE_INTERVAL_S):
            self.notice()
            with self._lock:
                missing, self._missing = self._missing, 0
            for _ in range(missing):
                if self._stop.is_set():
                    return
                exited_at = time.time()
                try:
                    (new,) = self.start(1)
                except RuntimeError as exc:
                    self.exits.append(WorkerExit("replacement", 0, None, time.time(), [str(exc)]))
                    continue
                self.replaced.append((new.name, time.time() - exited_at))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=READY_TIMEOUT_S + 5)
        with self._lock:
            procs = list(self.procs)
        for proc in procs:
            proc.stop()


def model(base_url: str, name: str, **extra: Any) -> dict[str, Any]:
    """An OpenAI-dialect model of the mock upstream."""
    return {"provider": "openai", "base_url": f"{base_url}/v1", "model": name, **extra}


def worker_env(
    *, redis_url: str, prefix: str, queue: str, agents_file: Path, extra: Mapping[str, str]
) -> dict[str, str]:
    """A worker's environment: this one's minus ``RELIEVER_*``, plus the scenario's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELIEVER_")}
    env.update(
        RELIEVER_ENVIRONMENT="test",
        RELIEVER_REDIS_URL=redis_url,
        RELIEVER_KEY_PREFIX=prefix,
        RELIEVER_QUEUE=queue,
        RELIEVER_AGENTS_FILE=str(agents_file),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Rig:
    """One scenario's stack: its Redis server, the mock upstream and its workers.

    Args:
        name: the scenario (its logs go to ``log_dir/name``).
        log_dir: the run's log directory.
        agents: ``base_url -> agents document`` (models point at the mock).
        mock_steps: model name -> the mock's steps for it.
        aof: the Redis server keeps an fsynced append-only file (restart scenarios).
        env: more worker environment (``RELIEVER_LEASE_TTL_S`` …, secrets).
        concurrency: per worker process.
        workers: how many worker processes run (started by ``__enter__``).
        start_workers: False leaves starting them to the scenario.
    """

    def __init__(
        self,
        name: str,
        log_dir: Path,
        *,
        agents: Any,
        mock_steps: Mapping[str, Sequence[Mapping[str, Any]]],
        aof: bool = False,
        env: Mapping[str, str] | None = None,
        concurrency: int = 25,
        workers: int = 2,
        start_workers: bool = True,
    ) -> None:
        self.name = name
        self.dir = log_dir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self._agents = agents
        self._mock_steps = mock_steps
        self._aof = aof
        self._env = dict(env or {})
        self._concurrency = concurrency
        self._count = workers
        self._start_workers = start_workers
        self.prefix = f"chaos-{name}-{uuid.uuid4().hex[:6]}"
        self.queue = f"{self.prefix}-q"
        self._stack = ExitStack()

    def __enter__(self) -> Rig:
        try:
            self.redis_server = RedisServer(self.dir, aof=self._aof)
            self.redis_server.start()
            self._stack.callback(self.redis_server.stop)
            self.redis = self.redis_server.client()
            self._stack.callback(self.redis.close)
            self.mock = MockUpstream(self.dir, self._mock_steps)
            self._stack.callback(self.mock.stop)
            self.agents_file = self.dir / "agents.yaml"
            self.agents_file.write_text(yaml.safe_dump(self._agents(self.mock.url)), "utf-8")
            env = worker_env(
                redis_url=self.redis_server.url,
                prefix=self.prefix,
                queue=self.queue,
                agents_file=self.agents_file,
                extra=self._env,
            )
            self.workers = Workers(self.dir, env, concurrency=self._concurrency, count=self._count)
            self._stack.callback(self.workers.close)
            if self._start_workers:
                self.workers.start()
            self.workers.supervise()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def worker_logs(self) -> Iterator[tuple[str, str]]:
        """(worker name, its whole output) for every worker that ran."""
        for proc in self.workers.procs:
            yield proc.name, proc.output()
