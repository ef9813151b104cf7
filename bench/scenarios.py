"""The fixed upstream scenarios and the agents files the benchmarks run against."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PROMPT = [{"role": "user", "content": "benchmark"}]


@dataclass(frozen=True, slots=True)
class Fixed:
    """A fixed stream: ``chunks`` text chunks of ``chunk_chars`` characters, no delay."""

    model: str
    chunks: int
    chunk_chars: int = 6

    @property
    def text(self) -> str:
        # Words of chunk_chars - 1 characters plus the space mockllm keeps: every chunk but
        # the last is exactly chunk_chars long.
        width = self.chunk_chars - 1
        return " ".join(f"w{i:0{width - 1}d}"[-width:] for i in range(self.chunks))

    def mock_steps(self) -> list[dict[str, Any]]:
        return [{"type": "reply", "text": self.text, "chunk_words": 1, "delay_s": 0}]


# Issue 2's overhead run and issue 3's latency run stream the same response.
OVERHEAD = Fixed("bench-fixed", chunks=128)
# A short job for throughput: a handful of chunks.
SHORT = Fixed("bench-short", chunks=8)
# The second model of the two-model chain (issue 5): the same response under another name.
OVERHEAD_FALLBACK = Fixed("bench-fixed-b", chunks=128)
# Delta events per second: long fast streams.
LONG = Fixed("bench-long", chunks=1000)
# Failover: the primary always answers 503, the fallback streams a short answer.
FAILING = "fo-primary"
RESCUE = Fixed("fo-fallback", chunks=8)
# reliever's agents-file default backoff, jitter off: planned waits are exact.
BACKOFF = {"base": "200ms", "factor": 2, "max": "2s", "jitter": 0}
CHAIN_AGENT = "bench-chain"


def request_body(model: str) -> dict[str, Any]:
    """What the OpenAI adapter sends for PROMPT (the floor sends the same)."""
    return {
        "model": model,
        "messages": PROMPT,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _model(base_url: str, name: str) -> dict[str, Any]:
    return {
        "provider": "openai",
        "base_url": f"{base_url}/v1",
        "model": name,
        "timeouts": {"connect": "5s", "first_token": "30s", "idle": "30s", "total": "5m"},
    }


def write_chain_agents(path: Path, base_url: str, primary: str, fallback: str) -> Path:
    """Agent ``bench-chain``: ``primary`` then ``fallback``, 2 retries each, the default
    backoff with jitter off, a 1 minute cooldown armed by exhausted retries too.

    LiteLLM's Router gets the same chain and policy (``bench.litellm_router``).
    """
    doc = {
        "models": {name: _model(base_url, name) for name in (primary, fallback)},
        "agents": {
            CHAIN_AGENT: {
                "model": primary,
                "fallbacks": [fallback],
                "retries": 2,
                "cooldown": "1m",
                "cooldown_on_exhausted": True,
                "retry_on_rate_limit": False,
                "backoff": BACKOFF,
            }
        },
    }
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def write_agents(path: Path, base_url: str, models: list[str]) -> Path:
    """One agent per model (``agent == model``), no fallbacks, no retries.

    Timeouts are generous (slow streams run for tens of seconds); retries are off so that
    an upstream failure shows as a failed job instead of hiding behind a retry.
    """
    doc = {
        "models": {
            name: {
                "provider": "openai",
                "base_url": f"{base_url}/v1",
                "model": name,
                "timeouts": {"connect": "5s", "first_token": "30s", "idle": "30s", "total": "5m"},
            }
            for name in models
        },
        "agents": {name: {"model": name, "retries": 0} for name in models},
    }
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def chunk_texts(data: str) -> list[str]:
    """The content texts of one OpenAI chunk's ``data:`` (none for ``[DONE]``).

    What the floor does with each chunk: ``json.loads`` and take the content.
    """
    if data == "[DONE]":
        return []
    chunk = json.loads(data)
    return [
        text
        for choice in chunk.get("choices") or []
        if (text := (choice.get("delta") or {}).get("content"))
    ]
