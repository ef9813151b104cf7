"""What every benchmark shares: statistics, machine facts, namespaces, subprocesses."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from settings import Settings

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
# redis-py 8 caps a connection pool at 100 connections by default and then raises
# MaxConnectionsError; a worker whose job threads each hold one during a call needs more.
# Workers started here get ``?max_connections=`` in their URL (see Namespace.settings_env).
POOL_HEADROOM = 100
PACKAGES = (
    "celery",
    "kombu",
    "redis",
    "httpx",
    "httpcore",
    "httpx-sse",
    "pydantic",
    "gevent",
    "greenlet",
    "hiredis",
    "litellm",
    "openai",
    "httpx2",
)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between closest ranks; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, mean, p50, p95, p99 and max of ``values``."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "mean": sum(values) / len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values),
    }


# --- the machine --------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.stdout.strip()


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def machine_info() -> dict[str, Any]:
    """Cores, memory, Python, package versions, Redis, and the commit measured."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    try:
        server = redis.Redis.from_url(REDIS_URL).info("server")
        redis_version = str(server.get("redis_version", "?"))
    except redis.RedisError:
        redis_version = "unreachable"
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "worker", "tasks")
    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": versions,
        "redis_server": redis_version,
        "commit": _git("rev-parse", "--short", "HEAD"),
        "worker_tree_dirty": bool(dirty),
        "dirty_files": dirty.splitlines(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# --- Redis namespaces -----------------------------------------------------------------------


@dataclass
class Namespace:
    """A unique key prefix and queue on the benchmark database, removed afterwards."""

    name: str = field(default_factory=lambda: f"bench-{uuid.uuid4().hex[:8]}")
    redis_url: str = REDIS_URL
    job_ids: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return self.name

    @property
    def queue(self) -> str:
        return f"{self.name}-q"

    def settings(self, agents_file: Path | None = None) -> Settings:
        """Settings on this namespace (for the in-process runs and the clients)."""
        extra = {} if agents_file is None else {"agents_file": str(agents_file)}
        return Settings(
            _env_file=None,
            environment="test",
            redis_url=self.redis_url,
            key_prefix=self.prefix,
            queue=self.queue,
            **extra,
        )

    def settings_env(
        self, agents_file: Path, *, max_connections: int | None = None, **extra: str
    ) -> dict[str, str]:
        """A worker's environment: the parent's, minus RELIEVER_*, plus this namespace.

        ``max_connections``: the Redis pool size put in the worker's URL (None: redis-py's
        default, 100).
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELIEVER_")}
        url = self.redis_url
        if max_connections is not None:
            url += f"{'&' if '?' in url else '?'}max_connections={max_connections}"
        env.update(
            RELIEVER_ENVIRONMENT="test",
            RELIEVER_REDIS_URL=url,
            # kombu refuses the pool option in a URL: broker and results keep the plain one.
            RELIEVER_BROKER_URL=self.redis_url,
            RELIEVER_RESULT_BACKEND=self.redis_url,
            RELIEVER_KEY_PREFIX=self.prefix,
            RELIEVER_QUEUE=self.queue,
            RELIEVER_AGENTS_FILE=str(agents_file),
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def cleanup(self) -> int:
        """Delete this namespace's keys, its queue and its jobs' Celery results."""
        client = redis.Redis.from_url(self.redis_url)
        removed = 0
        try:
            batch: list[Any] = []
            for pattern in (f"{self.prefix}:*", f"{self.queue}*", f"*{self.queue}*"):
                for key in client.scan_iter(match=pattern, count=1000):
                    batch.append(key)
                    if len(batch) >= 500:
                        removed += int(client.delete(*batch))
                        batch = []
            batch += [f"celery-task-meta-{job_id}" for job_id in self.job_ids]
            for i in range(0, len(batch), 500):
                removed += int(client.delete(*batch[i : i + 500]))
        finally:
            client.close()
        return removed


# --- subprocesses ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proc:
    """A subprocess whose output goes to a log file; stopped by its own pid only."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        log_dir: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("w", encoding="utf-8")
        self.popen = subprocess.Popen(
            self.cmd,
            cwd=ROOT,
            env=dict(env) if env is not None else None,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, text: str, timeout_s: float) -> None:
        """Wait until ``text`` appears in the output.

        Raises:
            RuntimeError: the process exited, or ``timeout_s`` passed.
        """
        ends = time.monotonic() + timeout_s
        while time.monotonic() < ends:
            if text in self.output():
                return
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(
            f"{self.name}: no {text!r} within {timeout_s}s:\n{self.output()[-3000:]}"
        )

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        self._log.close()


def start_mockllm(log_dir: Path, scenarios: Mapping[str, Any]) -> tuple[Proc, str]:
    """``python -m worker.mockllm`` with ``scenarios``, in its own process; (proc, base URL)."""
    path = log_dir / "mockllm-scenarios.json"
    path.write_text(json.dumps(scenarios), encoding="utf-8")
    port = free_port()
    proc = Proc(
        "mockllm",
        [sys.executable, "-m", "worker.mockllm", "--port", str(port), "--scenarios", str(path)],
        log_dir,
    )
    proc.wait_for("listening", 15)
    return proc, f"http://127.0.0.1:{port}"


def procfile_worker() -> tuple[str, int]:
    """The pool and the default concurrency of the Procfile's ``worker`` line."""
    for line in (ROOT / "Procfile").read_text(encoding="utf-8").splitlines():
        if line.startswith("worker:"):
            pool = re.search(r"--pool (\w+)", line)
            conc = re.search(r"--concurrency \$\{RELIEVER_CONCURRENCY:-(\d+)\}", line)
            if pool and conc:
                return pool.group(1), int(conc.group(1))
    raise RuntimeError("Procfile: no worker line with --pool and --concurrency")


def worker_command(pool: str, concurrency: int, hostname: str, *, app: str = "worker") -> list[str]:
    """The Procfile's worker line (pool and concurrency stated), plus a unique hostname.

    ``--without-mingle --without-gossip`` keep a benchmark worker from talking to others
    that may share the Redis server; they change nothing on the job path. ``app``: the
    Celery app module (``bench.plain_celery`` for the hand-written baseline).
    """
    return [
        sys.executable, "-m", "celery", "-A", app, "worker",
        "--pool", pool, "--concurrency", str(concurrency),
        "--prefetch-multiplier", "1", "-E", "--loglevel", "INFO",
        "--hostname", f"{hostname}@%h", "--without-mingle", "--without-gossip",
    ]  # fmt: skip


def start_worker(
    log_dir: Path, env: Mapping[str, str], *, pool: str, concurrency: int, name: str
) -> Proc:
    proc = Proc(name, worker_command(pool, concurrency, name), log_dir, env)
    proc.wait_for(" ready.", 60)
    return proc


# --- RSS and CPU of a process -----------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` in MB (0 when it is gone)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def threads_of(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds ``pid`` used so far (its threads included)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    return 0.0


def redis_server_pid() -> int | None:
    with contextlib.suppress(redis.RedisError, KeyError, ValueError):
        return int(redis.Redis.from_url(REDIS_URL).info("server")["process_id"])
    return None


class Sampler:
    """Samples RSS and CPU of some processes every ``interval_s`` in a background thread."""

    def __init__(self, pids: Mapping[str, int], interval_s: float = 0.5) -> None:
        self.pids = dict(pids)
        self.interval_s = interval_s
        self.rss: dict[str, list[float]] = {name: [] for name in pids}
        self.threads: dict[str, list[int]] = {name: [] for name in pids}
        self._marks: dict[str, tuple[float, dict[str, float]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self.mark("start")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.mark("end")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            for name, pid in self.pids.items():
                self.rss[name].append(rss_mb(pid))
                self.threads[name].append(threads_of(pid))

    def mark(self, label: str) -> None:
        """Remember CPU seconds of every process now, under ``label``."""
        self._marks[label] = (
            time.monotonic(),
            {name: cpu_s(pid) for name, pid in self.pids.items()},
        )

    def cpu_percent(self, start: str, end: str) -> dict[str, float]:
        """Each process's CPU between two marks, in percent of one core."""
        t0, c0 = self._marks[start]
        t1, c1 = self._marks[end]
        span = max(t1 - t0, 1e-9)
        return {name: 100.0 * (c1[name] - c0[name]) / span for name in self.pids}

    def peak_rss(self) -> dict[str, float]:
        return {
            name: max(values, default=rss_mb(self.pids[name])) for name, values in self.rss.items()
        }

    def peak_threads(self) -> dict[str, int]:
        return {name: max(values, default=0) for name, values in self.threads.items()}


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def chunked(items: Iterable[Any], size: int) -> list[list[Any]]:
    out: list[list[Any]] = []
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            out.append(batch)
            batch = []
    if batch:
        out.append(batch)
    return out
