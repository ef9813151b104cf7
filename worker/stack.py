"""``python -m worker.stack``: the whole stack on one machine, then the demo.

Checks Redis (starts a local ``redis-server`` when none answers and one is installed,
else says what to install), starts the Procfile's ``mockllm``, ``worker``, ``flower`` and
``web`` (the example web app) with honcho, waits for the worker, runs the demo
(``worker.demo``) in the foreground and keeps the stack up until Ctrl-C
(``--exit-after-demo`` stops it after the demo instead; ``--no-demo`` skips the demo). The
services' output goes to a log file whose path is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

from settings import Settings
from worker.client import Client
from worker.demo import run_demo

ROOT = Path(__file__).resolve().parent.parent
DEMO_AGENTS = ROOT / "examples" / "agents.demo.yaml"
READY_TIMEOUT_S = 60.0


def redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def ensure_redis(url: str) -> str | None:
    """None when Redis answers (started here if need be), else what the user must do."""
    if redis_answers(url):
        return None
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    if host not in ("127.0.0.1", "localhost", "::1"):
        return f"Redis at {host}:{port} does not answer; start it or set RELIEVER_REDIS_URL."
    server = shutil.which("redis-server")
    if server is None:
        return (
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
            print(f"started redis-server on 127.0.0.1:{port}")
            return None
        time.sleep(0.1)
    return f"redis-server was started on port {port} but does not answer."


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.stack", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--exit-after-demo", action="store_true", help="stop after the demo")
    mode.add_argument("--no-demo", action="store_true", help="keep the stack up, no demo")
    args = parser.parse_args(argv)

    env = dict(os.environ)
    # The Procfile's `python` and `celery` are this environment's, venv or not.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if "RELIEVER_AGENTS_FILE" not in env and not (ROOT / "agents.yaml").exists():
        env["RELIEVER_AGENTS_FILE"] = str(DEMO_AGENTS)
    env.setdefault("RELIEVER_FLOWER_PORT", "5555")
    env.setdefault("RELIEVER_WEB_PORT", "8000")
    os.environ.update(env)
    settings = Settings()
    problem = ensure_redis(settings.redis_url)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1

    log_path = Path(tempfile.gettempdir()) / "reliever-stack.log"
    print(f"starting mockllm, worker, flower and web (logs: {log_path})")
    with log_path.open("w") as log:
        stack = subprocess.Popen(
            [sys.executable, "-m", "honcho", "-f", str(ROOT / "Procfile"), "start",
             "mockllm", "worker", "flower", "web"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        client = Client(settings=settings)
        try:
            if not wait_for_worker(client, READY_TIMEOUT_S):
                print(f"the worker did not start; see {log_path}", file=sys.stderr)
                return 1
            ok = True
            if not args.no_demo:
                ends = [r["type"] for r in run_demo(client)]
                ok = ends == ["completed", "completed", "completed", "failed"]
            user = settings.flower_basic_auth.get_secret_value().split(":", 1)[0]
            print(
                f"\nFlower: http://127.0.0.1:{env['RELIEVER_FLOWER_PORT']} (user {user!r}, "
                "password from RELIEVER_FLOWER_BASIC_AUTH)"
            )
            print(f"Web app: http://127.0.0.1:{env['RELIEVER_WEB_PORT']} (examples/web)")
            if not args.exit_after_demo:
                print("The stack keeps running; Ctrl-C stops it.")
                stack.wait()
            return 0 if ok else 1
        except KeyboardInterrupt:
            return 0
        finally:
            client.close()
            if stack.poll() is None:
                os.killpg(stack.pid, signal.SIGTERM)
                try:
                    stack.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(stack.pid, signal.SIGKILL)
                    stack.wait()


if __name__ == "__main__":
    sys.exit(main())
