"""``python -m worker``: the operator's commands.

``check [--agents FILE]`` validates the configuration and pings its servers before a
deploy (``worker.check``: exit 0 all well, 1 not ready, 2 broken).

``run --agents FILE --job FILE|-`` runs one job in this process, through the chain
executor with no broker (Redis only for cooldowns, from ``RELIEVER_REDIS_URL``), and
prints every event as one JSON line on stdout. Exit status: 0 the job completed, 1 it
failed, 2 the agents file or the job is bad (message on stderr). Operators use it to try
an agents file against real or mock providers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from settings import Settings, describe_errors
from worker import check
from worker.agents import load_agents
from worker.errors import EXIT_CONFIG, ConfigError, InvalidJob, UnknownAgent
from worker.events import JsonLinesEventSink
from worker.jobs import parse_job
from worker.runtime import build_runtime

EXIT_BAD_JOB = EXIT_CONFIG
"""A job that cannot be read or is invalid stops ``run`` like a broken agents file."""


def _read_job(source: str) -> Any:
    text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    return json.loads(text)


def run(args: argparse.Namespace) -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"bad settings: {describe_errors(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        agents = load_agents(args.agents, loopback_only=settings.loopback_only)
    except ConfigError as exc:
        print(exc.message, file=sys.stderr)
        return EXIT_CONFIG
    try:
        raw = _read_job(args.job)
    except (OSError, ValueError) as exc:
        print(f"{args.job}: cannot read the job as JSON ({type(exc).__name__})", file=sys.stderr)
        return EXIT_BAD_JOB
    try:
        job = parse_job(raw, max_bytes=settings.max_job_bytes)
        agent = agents.get(job.agent)
        if agent is None:
            raise UnknownAgent(f"agent {job.agent!r} is not in {agents.source}")
    except (InvalidJob, UnknownAgent) as exc:
        print(f"{args.job}: {exc.message}", file=sys.stderr)
        return EXIT_BAD_JOB
    try:
        runtime = build_runtime(settings, agents=agents)
    except ConfigError as exc:
        print(exc.message, file=sys.stderr)
        return EXIT_CONFIG
    try:
        sink = JsonLinesEventSink(job.job_id, runtime.clock, sys.stdout)
        outcome = runtime.executor.run(job, agent, sink)
    finally:
        runtime.close()
    return 0 if outcome.status == "completed" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run one job in-process and print its events")
    run_p.add_argument("--agents", required=True, help="the agents file (YAML)")
    run_p.add_argument("--job", required=True, help="the job (JSON file, or - for stdin)")
    check_p = sub.add_parser("check", help="validate the configuration before a deploy")
    check_p.add_argument("--agents", help="the agents file (default: RELIEVER_AGENTS_FILE)")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args)
    return check.main(args.agents)


if __name__ == "__main__":
    sys.exit(main())
