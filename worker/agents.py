"""The agents file: its YAML schema, durations, and the resolved agents the executor runs.

A file is parsed once (at worker start, or by ``python -m worker run``). Every mistake in it
becomes one :class:`~worker.errors.ConfigError` naming the file, the key path
(``agents.support.fallbacks[0]``) and the problem. The key itself never appears in the file:
a model names the environment variable that holds it (``api_key_env``), read at use.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from worker.errors import ConfigError
from worker.retry import BackoffPolicy

# Whole milliseconds per unit: summing in ms and dividing once keeps "9ms" exactly 9/1000
# (9 * 0.001 is not), so format_duration and parse_duration round-trip.
_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_duration(value: Any) -> float:
    """Seconds from ``200ms``, ``30s``, ``1m``, ``1h``, ``1m30s`` or a bare number of seconds.

    Raises:
        ValueError: the value is not a duration, or is negative.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 200ms, 30s or 1m, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"expected a duration such as 200ms, 30s or 1m, got {value!r}")
        seconds = sum(float(n) * _UNITS_MS[u] for n, u in parts) / 1000
    else:
        raise ValueError(f"expected a duration such as 200ms, 30s or 1m, got {value!r}")
    if not math.isfinite(seconds):
        raise ValueError(f"a duration must be finite, got {value!r}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of ``seconds`` that :func:`parse_duration` reads back."""
    ms = round(seconds * 1000)
    if ms % 3_600_000 == 0 and ms:
        return f"{ms // 3_600_000}h"
    if ms % 60_000 == 0 and ms:
        return f"{ms // 60_000}m"
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    """Per-model budgets: connect, to the first delta, between deltas, and in all."""

    connect: Duration = 5.0
    first_token: Duration = 30.0
    idle: Duration = 30.0
    total: Duration = 600.0


class BackoffConfig(_Strict):
    base: Duration = 0.2
    factor: float = Field(2.0, ge=1.0)
    max: Duration = 2.0
    jitter: float = Field(0.1, ge=0.0, le=1.0)


class ModelConfig(_Strict):
    provider: Literal["openai", "anthropic", "gemini"]
    base_url: str
    model: str = Field(min_length=1)
    api_key_env: str | None = None
    timeouts: Timeouts = Timeouts()
    max_tokens: int | None = Field(None, gt=0)


class AgentConfig(_Strict):
    model: str = Field(min_length=1)
    fallbacks: list[str] = []
    retries: int = Field(2, ge=0)
    cooldown: Duration = 60.0
    cooldown_on_exhausted: bool = True
    retry_on_rate_limit: bool = False
    backoff: BackoffConfig = BackoffConfig()


class AgentsFileModel(_Strict):
    models: dict[str, ModelConfig]
    agents: dict[str, AgentConfig]


@dataclass(frozen=True, slots=True)
class ModelRef:
    """One model of a chain, resolved: what a provider adapter needs to call it."""

    name: str
    provider: str
    base_url: str
    model: str
    api_key_env: str | None
    timeouts: Timeouts
    max_tokens: int | None
    source: str

    def __repr__(self) -> str:
        return f"ModelRef({self.name!r}, provider={self.provider!r}, model={self.model!r})"

    def api_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The key from the variable ``api_key_env`` names; None when the model needs none.

        Raises:
            ConfigError: the variable is named but not set.
        """
        if self.api_key_env is None:
            return None
        env = os.environ if environ is None else environ
        value = env.get(self.api_key_env)
        if not value:
            raise ConfigError(
                f"{self.source}: models.{self.name}.api_key_env: "
                f"environment variable {self.api_key_env} is not set"
            )
        return value


@dataclass(frozen=True, slots=True)
class Agent:
    """An agent resolved from the file: its chain and the rules' knobs."""

    name: str
    chain: tuple[ModelRef, ...]
    retries: int
    cooldown_s: float
    cooldown_on_exhausted: bool
    retry_on_rate_limit: bool
    backoff: BackoffPolicy

    @property
    def max_attempts(self) -> int:
        return 1 + self.retries

    @property
    def chain_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.chain)


@dataclass(frozen=True, slots=True)
class Agents:
    """Every agent of one agents file."""

    source: str
    agents: Mapping[str, Agent]

    def get(self, name: str) -> Agent | None:
        return self.agents.get(name)


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_agents(data: Any, *, source: str, loopback_only: bool = False) -> Agents:
    """Validate parsed YAML into :class:`Agents`.

    Args:
        data: the YAML document, already parsed.
        source: the file name used in error messages.
        loopback_only: refuse any model whose ``base_url`` is not a loopback address
            (set in tests, so that no test can reach a real provider).

    Raises:
        ConfigError: one error listing every problem with its key path.
    """
    try:
        parsed = AgentsFileModel.model_validate(data)
    except ValidationError as exc:
        problems = [f"{_key_path(e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None

    problems = []
    for name, cfg in parsed.models.items():
        scheme = urlsplit(cfg.base_url).scheme
        if scheme not in ("http", "https"):
            problems.append(f"models.{name}.base_url: expected an http(s) URL")
        elif loopback_only and not _is_loopback(cfg.base_url):
            problems.append(f"models.{name}.base_url: only loopback URLs are allowed here")
    refs = {
        name: ModelRef(
            name=name,
            provider=cfg.provider,
            base_url=cfg.base_url.rstrip("/"),
            model=cfg.model,
            api_key_env=cfg.api_key_env,
            timeouts=cfg.timeouts,
            max_tokens=cfg.max_tokens,
            source=source,
        )
        for name, cfg in parsed.models.items()
    }
    agents: dict[str, Agent] = {}
    for name, agent in parsed.agents.items():
        chain_names = [agent.model, *agent.fallbacks]
        paths = [f"agents.{name}.model"] + [
            f"agents.{name}.fallbacks[{i}]" for i in range(len(agent.fallbacks))
        ]
        known = ", ".join(sorted(refs)) or "none"
        for path, model_name in zip(paths, chain_names, strict=True):
            if model_name not in refs:
                problems.append(f"{path}: unknown model {model_name!r} (known: {known})")
        seen: set[str] = set()
        for path, model_name in zip(paths, chain_names, strict=True):
            if model_name in seen:
                problems.append(f"{path}: model {model_name!r} appears twice in the chain")
            seen.add(model_name)
        if problems:
            continue
        agents[name] = Agent(
            name=name,
            chain=tuple(refs[m] for m in chain_names),
            retries=agent.retries,
            cooldown_s=agent.cooldown,
            cooldown_on_exhausted=agent.cooldown_on_exhausted,
            retry_on_rate_limit=agent.retry_on_rate_limit,
            backoff=BackoffPolicy(
                base_s=agent.backoff.base,
                factor=agent.backoff.factor,
                max_s=agent.backoff.max,
                jitter=agent.backoff.jitter,
            ),
        )
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return Agents(source=source, agents=agents)


def load_agents(path: str | Path, *, loopback_only: bool = False) -> Agents:
    """Read and validate an agents file.

    Raises:
        ConfigError: the file is missing, is not YAML, or fails validation.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the agents file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}: not valid YAML{where}") from None
    return parse_agents(data, source=source, loopback_only=loopback_only)
