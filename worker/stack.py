"""``python -m worker.stack``: the whole stack on one machine, then the demo.

Checks Redis (starts a local ``redis-server`` when none answers and one is installed,
else says what to install), starts the Procfile's ``mockllm``, ``worker``, ``flower`` and
``web`` (the example web app) with honcho, waits for the worker, runs the demo
(``worker.demo``) in the foreground and keeps the stack up until it is stopped
(``--exit-after-demo`` stops it after the demo instead; ``--no-demo`` skips the demo). The
services' output goes to a log file whose path is printed.

SIGINT (Ctrl-C), SIGTERM and SIGHUP stop the stack at any point: while it waits for the
worker, during the demo, or while it keeps running. Honcho's process group gets SIGTERM
(honcho passes it on to each service, and kills what is left 5 s after the first one
stopped); what still runs after ``STOP_TIMEOUT_S`` is killed (SIGKILL), honcho and each
service's process group. A ``redis-server`` started here is shut down as well (``SHUTDOWN
NOSAVE``); a Redis that was already running is left alone.

Exit status:

- 0: stopped by a signal, or the demo gave the expected results (``--exit-after-demo``);
- 1: no Redis; the worker did not answer within ``READY_TIMEOUT_S``; the demo failed (also
  when a signal stops the stack after it); a service exited by itself (honcho stops the
  others and exits: the message names the service and the log file).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

import redis

from settings import Settings
from worker.client import Client
from worker.demo import run_demo

ROOT = Path(__file__).resolve().parent.parent
DEMO_AGENTS = ROOT / "examples" / "agents.demo.yaml"
SERVICES = ("mockllm", "worker", "flower", "web")
READY_TIMEOUT_S = 60.0
STARTED_TIMEOUT_S = 10.0
"""How long a stop waits for honcho to report every service started (see :func:`stop`)."""
STOP_TIMEOUT_S = 15.0
"""How long honcho gets after SIGTERM before it and the services are killed."""
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
DEMO_ENDS = ["completed", "completed", "completed", "failed"]

# Honcho reports each service it starts and each that stops, as lines of its own.
_HONCHO_LINE = re.compile(
    r"^\d\d:\d\d:\d\d system +\| (?P<name>\S+) "
    r"(?:started \(pid=(?P<pid>\d+)\)|stopped \(rc=(?P<rc>-?\d+)\))$"
)


class StopRequested(BaseException):
    """A stop signal arrived.

    A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on the way
    (Redis, kombu) takes it for an error of its own.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class ServicesExited(BaseException):
    """Honcho exited by itself: a service stopped, and honcho stopped the others."""


class Interrupts:
    """Stop signals and honcho's exit, raised in the main thread while armed.

    A stop signal that arrives unarmed (while Redis is checked, while honcho is started)
    is raised as :meth:`armed` is entered; one that arrives while the stack is being
    stopped changes nothing. Honcho's exit is noticed by SIGCHLD.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._honcho: subprocess.Popen[bytes] | None = None
        self._armed = False
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_stop_signal)
        signal.signal(signal.SIGCHLD, self._on_child)

    def watch(self, honcho: subprocess.Popen[bytes]) -> None:
        self._honcho = honcho

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """Raise :class:`StopRequested` or :class:`ServicesExited` as they happen, once."""
        self._armed = True
        try:
            self._raise_if_armed()
            yield
        finally:
            self._armed = False

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        self._raise_if_armed()

    def _on_child(self, _signum: int, _frame: FrameType | None) -> None:
        self._raise_if_armed()

    def _raise_if_armed(self) -> None:
        if not self._armed:
            return
        if self.signum is not None:
            self._armed = False
            raise StopRequested(self.signum)
        if self._honcho is not None and self._honcho.poll() is not None:
            self._armed = False
            raise ServicesExited


class HonchoLog:
    """What honcho reported in its log: each service's process group and exit status.

    Honcho starts each service in a session of its own, so the pid it reports (the
    service's shell) is the service's process group. The log is read through a handle
    opened at the start, incrementally, whole lines only.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started: dict[str, int] = {}
        self.stopped: dict[str, int] = {}
        self._file = path.open("rb")

    def read(self) -> None:
        """Take in the lines honcho wrote since the last read."""
        while True:
            position = self._file.tell()
            raw = self._file.readline()
            if not raw.endswith(b"\n"):
                self._file.seek(position)
                return
            match = _HONCHO_LINE.match(raw.decode("utf-8", "replace").rstrip("\r\n"))
            if match is None:
                continue
            if match["pid"] is not None:
                self.started[match["name"]] = int(match["pid"])
            else:
                self.stopped[match["name"]] = int(match["rc"])

    def running(self) -> dict[str, int]:
        """The services reported started and not stopped: name to process group."""
        self.read()
        return {name: pid for name, pid in self.started.items() if name not in self.stopped}

    def close(self) -> None:
        self._file.close()


def redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class RedisUnavailable(Exception):
    """No Redis answers and none can be started here; the message says what to do."""


def ensure_redis(url: str) -> int | None:
    """Make Redis answer at ``url``.

    Returns:
        The port of the ``redis-server`` started here, or None when Redis answered already.

    Raises:
        RedisUnavailable: Redis is not local, not installed, or does not answer.
    """
    if redis_answers(url):
        return None
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise RedisUnavailable(
            f"Redis at {host}:{port} does not answer; start it or set RELIEVER_REDIS_URL."
        )
    server = shutil.which("redis-server")
    if server is None:
        raise RedisUnavailable(
            "No Redis answers and redis-server is not installed. Install it "
            "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis) "
            "or point RELIEVER_REDIS_URL at a running Redis."
        )
    subprocess.run(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "yes",
         "--save", "", "--appendonly", "no"],
        check=True,
    )  # fmt: skip
    ends = time.monotonic() + 10
    while time.monotonic() < ends:
        if redis_answers(url):
            print(f"started redis-server on 127.0.0.1:{port}", flush=True)
            return port
        time.sleep(0.1)
    raise RedisUnavailable(f"redis-server was started on port {port} but does not answer.")


def stop_redis(url: str, port: int) -> None:
    """Shut down the ``redis-server`` that :func:`ensure_redis` started (nothing saved)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
    try:
        client.shutdown(nosave=True)
    except redis.RedisError as exc:
        print(f"could not stop the redis-server on port {port}: {exc}", file=sys.stderr)
    else:
        print(f"stopped the redis-server on 127.0.0.1:{port}", flush=True)
    finally:
        client.close()


def wait_for_worker(client: Client, deadline_s: float) -> bool:
    from worker.celery import create_app

    app = create_app(client.settings)
    try:
        ends = time.monotonic() + deadline_s
        while time.monotonic() < ends:
            if app.control.ping(timeout=1.0):
                return True
        return False
    finally:
        app.close()


def stop(honcho: subprocess.Popen[bytes], log: HonchoLog) -> None:
    """Stop honcho and every service it started.

    Honcho's SIGTERM handler signals the services by the pids it has been told, so the
    SIGTERM waits (at most ``STARTED_TIMEOUT_S``) until honcho reported each service
    started. Whatever runs ``STOP_TIMEOUT_S`` later is killed: honcho's process group
    and each service's that honcho did not report stopped.
    """
    if honcho.poll() is None:
        ends = time.monotonic() + STARTED_TIMEOUT_S
        log.read()
        while len(log.started) < len(SERVICES) and honcho.poll() is None:
            if time.monotonic() >= ends:
                break
            time.sleep(0.05)
            log.read()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(honcho.pid, signal.SIGTERM)
        try:
            honcho.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"honcho did not stop within {STOP_TIMEOUT_S:.0f}s; killing", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(honcho.pid, signal.SIGKILL)
            honcho.wait()
    for pgid in log.running().values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def exited_by_itself(honcho: subprocess.Popen[bytes], log: HonchoLog) -> str:
    """The message for a stack whose honcho exited without being asked to."""
    log.read()
    first = next(iter(log.stopped.items()), None)
    if first is None:
        return f"honcho exited by itself (status {honcho.returncode}); see {log.path}"
    name, status = first
    return (
        f"{name} exited by itself (status {status}) and honcho stopped the other services; "
        f"see {log.path}"
    )


def run_stack(
    args: argparse.Namespace, env: dict[str, str], settings: Settings, interrupts: Interrupts
) -> int:
    """Start honcho, wait for the worker, run the demo, keep running; stop what started."""
    log_path = Path(tempfile.gettempdir()) / "reliever-stack.log"
    print(f"starting mockllm, worker, flower and web (logs: {log_path})", flush=True)
    with log_path.open("w") as log_file:
        honcho = subprocess.Popen(
            [sys.executable, "-m", "honcho", "-f", str(ROOT / "Procfile"), "start", *SERVICES],
            cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    interrupts.watch(honcho)
    log = HonchoLog(log_path)
    client = Client(settings=settings)
    demo_ok: bool | None = None
    try:
        with interrupts.armed():
            if not wait_for_worker(client, READY_TIMEOUT_S):
                print(f"the worker did not start; see {log_path}", file=sys.stderr)
                return 1
            if not args.no_demo:
                ends = [r["type"] for r in run_demo(client)]
                demo_ok = ends == DEMO_ENDS
                if not demo_ok:
                    print(
                        f"the demo failed: its jobs ended {', '.join(ends)}; expected "
                        f"{', '.join(DEMO_ENDS)}",
                        file=sys.stderr,
                    )
            user = settings.flower_basic_auth.get_secret_value().split(":", 1)[0]
            print(
                f"\nFlower: http://127.0.0.1:{env['RELIEVER_FLOWER_PORT']} (user {user!r}, "
                "password from RELIEVER_FLOWER_BASIC_AUTH)"
            )
            print(f"Web app: http://127.0.0.1:{env['RELIEVER_WEB_PORT']} (examples/web)")
            if args.exit_after_demo:
                return 0 if demo_ok else 1
            print("The stack keeps running; Ctrl-C stops it.", flush=True)
            honcho.wait()
            raise ServicesExited
    except StopRequested as stopped:
        print(f"\n{stopped}: stopping the stack", flush=True)
        return 1 if demo_ok is False else 0
    except ServicesExited:
        print(exited_by_itself(honcho, log), file=sys.stderr)
        return 1
    finally:
        client.close()
        stop(honcho, log)
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.stack", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--exit-after-demo", action="store_true", help="stop after the demo")
    mode.add_argument("--no-demo", action="store_true", help="keep the stack up, no demo")
    args = parser.parse_args(argv)
    interrupts = Interrupts()

    env = dict(os.environ)
    # The Procfile's `python` and `celery` are this environment's, venv or not.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if "RELIEVER_AGENTS_FILE" not in env and not (ROOT / "agents.yaml").exists():
        env["RELIEVER_AGENTS_FILE"] = str(DEMO_AGENTS)
    env.setdefault("RELIEVER_FLOWER_PORT", "5555")
    env.setdefault("RELIEVER_WEB_PORT", "8000")
    os.environ.update(env)
    settings = Settings()
    try:
        redis_port = ensure_redis(settings.redis_url)
    except RedisUnavailable as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        return run_stack(args, env, settings, interrupts)
    finally:
        if redis_port is not None:
            stop_redis(settings.redis_url, redis_port)


if __name__ == "__main__":
    sys.exit(main())
