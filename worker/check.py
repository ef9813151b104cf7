"""``python -m worker check [--agents FILE]``: is this configuration ready to deploy?

Validates the settings and the agents file, pings the Redis behind reliever's keys, the
broker and the result backend, names every ``api_key_env`` variable that is unset, and
prints the agents and their chains. Exit status:

- 0: all is well;
- 1: the configuration is valid, but this environment is not ready for it (a server does
  not answer, or a model's key variable is unset);
- 2: the configuration is broken (the message names the variable, or the file, key path
  and problem).

Nothing here prints a secret: URLs are shown without their passwords, keys by variable.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TextIO
from urllib.parse import urlsplit, urlunsplit

import redis
from pydantic import ValidationError

from settings import Settings, describe_errors
from worker.agents import Agents, format_duration, load_agents
from worker.errors import EXIT_CONFIG, ConfigError

EXIT_OK = 0
EXIT_NOT_READY = 1
PING_TIMEOUT_S = 3.0


def redact(url: str) -> str:
    """``url`` without its password (the user name stays)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


def ping(url: str) -> str | None:
    """None when the Redis at ``url`` answers PING, else why not."""
    client = redis.Redis.from_url(
        url, socket_timeout=PING_TIMEOUT_S, socket_connect_timeout=PING_TIMEOUT_S
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    return None


@dataclass
class Report:
    out: TextIO
    problems: list[str] = field(default_factory=list)

    def line(self, text: str) -> None:
        print(text, file=self.out)

    def problem(self, text: str) -> None:
        self.problems.append(text)
        self.line(f"  problem: {text}")


def _servers(settings: Settings, report: Report) -> None:
    roles: dict[str, list[str]] = {}
    for role, url in (
        ("redis", settings.redis_url),
        ("broker", settings.broker_url),
        ("result backend", settings.result_backend),
    ):
        if url is not None:
            roles.setdefault(url, []).append(role)
    for url, names in roles.items():
        role = ", ".join(names)
        failure = ping(url)
        if failure is None:
            report.line(f"{role}: {redact(url)} answers")
        else:
            report.line(f"{role}: {redact(url)} does not answer")
            report.problem(f"{role} at {redact(url)}: {failure}")


def _agents(agents: Agents, environ: Mapping[str, str], report: Report) -> None:
    report.line(f"agents file: {agents.source}: {len(agents.agents)} agent(s)")
    unset: dict[str, list[str]] = {}
    for agent in agents.agents.values():
        chain = " -> ".join(m.name for m in agent.chain)
        report.line(
            f"  {agent.name}: {chain} (retries {agent.retries}, "
            f"cooldown {format_duration(agent.cooldown_s)})"
        )
        for model in agent.chain:
            if model.api_key_env is not None and not environ.get(model.api_key_env):
                unset.setdefault(model.api_key_env, [])
                if model.name not in unset[model.api_key_env]:
                    unset[model.api_key_env].append(model.name)
    for variable, models in sorted(unset.items()):
        report.problem(
            f"{variable} is not set: every attempt on {', '.join(models)} fails without it"
        )


def check(agents_file: str | None, *, out: TextIO, environ: Mapping[str, str] | None = None) -> int:
    """Check the configuration from the environment (and ``agents_file`` if given)."""
    env = os.environ if environ is None else environ
    report = Report(out)
    try:
        settings = Settings()
    except ValidationError as exc:
        report.line(f"settings: broken: {describe_errors(exc)}")
        return EXIT_CONFIG
    report.line(
        f"settings: environment {settings.environment}, key prefix {settings.key_prefix!r}, "
        f"queue {settings.queue!r}"
    )
    path = agents_file or settings.agents_file
    try:
        agents = load_agents(path, loopback_only=settings.loopback_only)
    except ConfigError as exc:
        report.line(f"agents file: broken: {exc.message}")
        return EXIT_CONFIG
    _agents(agents, env, report)
    _servers(settings, report)
    if report.problems:
        report.line(f"not ready: {len(report.problems)} problem(s)")
        return EXIT_NOT_READY
    report.line("ok")
    return EXIT_OK


def main(agents_file: str | None) -> int:
    return check(agents_file, out=sys.stdout)
