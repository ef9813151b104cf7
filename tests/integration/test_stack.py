"""``python -m worker.stack`` as a supervisor runs it: real processes, stopped by signals.

Each test starts the stack in a session of its own, on free ports, with its own key
prefix, queue and log directory, and finds the processes the stack started by that
prefix in their environment (/proc): none may be left once the stack exited.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import yaml

from tests.http_support import ROOT, ServiceProcess, free_port, wait_for
from tests.service_support import worker_env

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/environ").exists(), reason="finds the stack's processes in /proc"
)

STARTING = "starting mockllm, worker, flower and web"
RUNNING = "The stack keeps running"
UP_TIMEOUT_S = 45.0
EXIT_TIMEOUT_S = 30.0
"""The stack's own bound is longer (honcho gets 15 s, then is killed); honcho stops the
services within about 5 s, so a stop that takes this long has gone wrong."""


def live_processes() -> Iterator[tuple[int, list[bytes], list[str]]]:
    """Every process (zombies aside) this test may read: pid, environment, argv."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            argv = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not readable
            continue
        if argv:
            yield (
                int(entry.name),
                environ.split(b"\0"),
                argv.decode(errors="replace").rstrip("\0").split("\0"),
            )


def processes_with(marker: str) -> dict[int, list[str]]:
    """Live processes whose environment holds ``marker`` (``NAME=value``): pid to argv."""
    return {pid: argv for pid, environ, argv in live_processes() if marker.encode() in environ}


def find(processes: dict[int, list[str]], command: str) -> int:
    """The pid of the process running ``command`` itself (not the shell that started it)."""
    pids = [
        pid
        for pid, argv in processes.items()
        if command in " ".join(argv) and Path(argv[0]).name != "sh"
    ]
    assert len(pids) == 1, (command, processes)
    return pids[0]


class StackProcess(ServiceProcess):
    """``python -m worker.stack`` in a session of its own, its output collected."""

    def __init__(self, proc: subprocess.Popen[str], marker: str, log_path: Path) -> None:
        super().__init__(proc)
        self.marker = marker
        self.log_path = log_path

    def wait_for_line(self, text: str) -> None:
        """Until the stack printed a line holding ``text``; fails if it exits first."""

        def printed() -> bool | None:
            exited = self.proc.poll() is not None
            if exited:
                self._reader.join(timeout=5)
            if any(text in line for line in self.lines):
                return True
            if exited:
                raise AssertionError(
                    f"the stack exited ({self.proc.returncode}) before printing {text!r}:\n"
                    f"{self.output()}"
                )
            return None

        wait_for(printed, timeout_s=UP_TIMEOUT_S, interval_s=0.05, what=text)

    def processes(self) -> dict[int, list[str]]:
        return processes_with(self.marker)

    def wait(self) -> int:
        """The stack's exit status, once every process it started is gone."""
        status = self.proc.wait(timeout=EXIT_TIMEOUT_S)
        self._reader.join(timeout=5)
        assert self.processes() == {}, self.output()
        return status


def demo_agents(path: Path, mock_port: int) -> Path:
    """The demo's agents file, its models on the mock at ``mock_port``."""
    doc = yaml.safe_load((ROOT / "examples" / "agents.demo.yaml").read_text(encoding="utf-8"))
    for model in doc["models"].values():
        model["base_url"] = f"http://127.0.0.1:{mock_port}/v1"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


@pytest.fixture
def start_stack(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> Iterator[Callable[..., StackProcess]]:
    """Start ``python -m worker.stack ARGS``; whatever it leaves running is killed after."""
    marker = f"RELIEVER_KEY_PREFIX={key_prefix}"
    stacks: list[StackProcess] = []

    def start(*args: str, redis_url: str = redis_url) -> StackProcess:
        mock_port = free_port()
        env = worker_env(
            redis_url=redis_url,
            prefix=key_prefix,
            queue_name=f"{key_prefix}-q",
            agents_file=demo_agents(tmp_path / "agents.yaml", mock_port),
            RELIEVER_MOCK_PORT=str(mock_port),
            RELIEVER_FLOWER_PORT=str(free_port()),
            RELIEVER_WEB_PORT=str(free_port()),
            RELIEVER_FLOWER_BASIC_AUTH="stack:stack-test",
            RELIEVER_CONCURRENCY="10",
            TMPDIR=str(tmp_path),
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.stack", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        stack = StackProcess(proc, marker, tmp_path / "reliever-stack.log")
        stacks.append(stack)
        return stack

    yield start
    for stack in stacks:
        stack.stop()

    def killed() -> bool | None:
        for pid in processes_with(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return True if not processes_with(marker) else None

    wait_for(killed, timeout_s=10, what="the stack's processes killed")
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"*{key_prefix}*"):
        client.delete(key)
    client.close()


def assert_all_running(processes: dict[int, list[str]]) -> None:
    for command in (
        "honcho",
        "worker.mockllm",
        "celery -A worker worker",
        "celery -A worker flower",
        "examples.web",
    ):
        assert any(command in " ".join(argv) for argv in processes.values()), command


@pytest.mark.parametrize(
    ("signum", "args", "line"),
    [
        pytest.param(signal.SIGTERM, ["--no-demo"], RUNNING, id="SIGTERM-while-running"),
        pytest.param(signal.SIGHUP, ["--no-demo"], RUNNING, id="SIGHUP-while-running"),
        pytest.param(signal.SIGHUP, [], "[job 1]", id="SIGHUP-during-the-demo"),
        pytest.param(signal.SIGTERM, [], STARTING, id="SIGTERM-while-starting"),
    ],
)
def test_a_stop_signal_stops_everything_the_stack_started_and_exits_0(
    start_stack: Callable[..., StackProcess], signum: signal.Signals, args: list[str], line: str
) -> None:
    """SIGTERM or SIGHUP at any point (honcho starting, the demo, the stack kept running)
    stops honcho and every service within a bounded time, and the stack exits 0."""
    stack = start_stack(*args)
    stack.wait_for_line(line)
    if line == RUNNING:
        assert_all_running(stack.processes())

    os.kill(stack.proc.pid, signum)

    assert stack.wait() == 0, stack.output()
    assert f"{signum.name}: stopping the stack" in stack.output()


def test_a_service_that_exits_by_itself_stops_the_stack_with_status_1(
    start_stack: Callable[..., StackProcess],
) -> None:
    """The worker killed under the stack: honcho stops the other services and exits, and
    the stack exits 1 by itself, naming the service and the log file."""
    stack = start_stack("--no-demo")
    stack.wait_for_line(RUNNING)
    processes = stack.processes()
    assert_all_running(processes)

    os.kill(find(processes, "celery -A worker worker"), signal.SIGKILL)

    assert stack.wait() == 1, stack.output()
    assert "worker.1 exited by itself" in stack.output()
    assert f"see {stack.log_path}" in stack.output()


def redis_servers_on(port: int) -> list[int]:
    """Pids of the redis-servers on ``port``, by their title (their environment is wiped)."""
    title = f"redis-server 127.0.0.1:{port}"
    return [pid for pid, _environ, argv in live_processes() if argv[0].endswith(title)]


@pytest.fixture
def redis_port() -> Iterator[int]:
    """A free port for the stack's own redis-server; one left running is killed after."""
    port = free_port()
    yield port
    for pid in redis_servers_on(port):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_the_stack_shuts_down_the_redis_server_it_started(
    start_stack: Callable[..., StackProcess], redis_port: int
) -> None:
    """No Redis answers on the configured port: the stack starts a redis-server there,
    and shuts it down when a signal stops the stack."""
    stack = start_stack("--no-demo", redis_url=f"redis://127.0.0.1:{redis_port}/0")
    stack.wait_for_line(RUNNING)
    assert len(redis_servers_on(redis_port)) == 1

    os.kill(stack.proc.pid, signal.SIGTERM)

    assert stack.wait() == 0, stack.output()
    assert f"stopped the redis-server on 127.0.0.1:{redis_port}" in stack.output()
    assert redis_servers_on(redis_port) == []
