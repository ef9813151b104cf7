"""A chain across OpenAI, Anthropic and Gemini, mid tool-calling conversation.

The end-to-end test runs ``python -m worker run`` as a subprocess against a MockLLM started
here, whose dialects record every request target: each earlier model fails in its own
dialect's way, the fallback continues the conversation, and no API key shows up in a URL,
an event, an error or the process's output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.mockllm import MockLLM, Reply, Status, StreamError
from worker.mockllm.anthropic import AnthropicDialect
from worker.mockllm.gemini import GeminiDialect
from worker.mockllm.openai import OpenAIDialect
from worker.mockllm.server import mask

ROOT = Path(__file__).resolve().parent.parent.parent
KEYS = {
    "XP_OPENAI_KEY": "sk-proj-crossprovider-openai-0123456789",
    "XP_ANTHROPIC_KEY": "sk-ant-api03-crossprovider-anthropic-0123456789",
    "XP_GEMINI_KEY": "AIzaSyCrossProviderGeminiKey0123456789ab",
}
TOOLS = [
    {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    }
]
CONVERSATION = [
    {"role": "system", "content": "You answer weather questions."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_abc123", "name": "get_weather", "arguments": '{"city": "Paris"}'}
        ],
    },
    {"role": "tool", "tool_call_id": "call_abc123", "content": '{"temp_c": 21, "sky": "sunny"}'},
]


class _Targets:
    """Request targets as sent (path and query), recorded by every dialect."""

    def __init__(self) -> None:
        self.seen: list[str] = []


def _recording(cls: type, targets: _Targets) -> Any:
    class Recording(cls):  # type: ignore[misc, valid-type]
        def model(self, path: str, body: Any) -> str:
            targets.seen.append(path)
            return str(super().model(path, body))

    return Recording()


@pytest.fixture
def targets() -> _Targets:
    return _Targets()


@pytest.fixture
def upstream(targets: _Targets) -> Iterator[MockLLM]:
    dialects = [_recording(c, targets) for c in (OpenAIDialect, AnthropicDialect, GeminiDialect)]
    with MockLLM(dialects=dialects) as mock:
        yield mock


def _agents(url: str) -> dict[str, Any]:
    return {
        "models": {
            "gpt": {
                "provider": "openai",
                "base_url": f"{url}/v1",
                "model": "gpt-4o-mini",
                "api_key_env": "XP_OPENAI_KEY",
            },
            "claude": {
                "provider": "anthropic",
                "base_url": url,
                "model": "claude-sonnet-4-5",
                "api_key_env": "XP_ANTHROPIC_KEY",
                "max_tokens": 1024,
            },
            "gemini": {
                "provider": "gemini",
                "base_url": url,
                "model": "gemini-2.5-flash",
                "api_key_env": "XP_GEMINI_KEY",
            },
        },
        "agents": {
            "weather": {
                "model": "gpt",
                "fallbacks": ["claude", "gemini"],
                "retries": 1,
                "backoff": {"base": "10ms", "factor": 2, "max": "20ms", "jitter": 0},
            }
        },
    }


def _run_worker(
    tmp_path: Path, url: str, redis_url: str, prefix: str, job: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    agents_file = tmp_path / "agents.yaml"
    agents_file.write_text(yaml.safe_dump(_agents(url)), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELIEVER_")}
    env.update(
        KEYS,
        RELIEVER_ENVIRONMENT="test",
        RELIEVER_REDIS_URL=redis_url,
        RELIEVER_KEY_PREFIX=prefix,
        PYTHONUNBUFFERED="1",
    )
    return subprocess.run(
        [sys.executable, "-m", "worker", "run", "--agents", str(agents_file), "--job", "-"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
        check=False,
    )


def test_chain_openai_anthropic_gemini_continues_tool_conversation(
    tmp_path, upstream, targets, redis_url, redis_client, key_prefix
):
    """OpenAI 429s, Anthropic breaks mid-stream then 529s, Gemini answers the tool result."""
    upstream.script("gpt-4o-mini", [Status(429, retry_after="30")])
    upstream.script(
        "claude-sonnet-4-5",
        [
            StreamError(after_chunks=2, error_code="overloaded_error", message="Overloaded"),
            Status(529),
        ],
    )
    upstream.script("gemini-2.5-flash", [Reply(text="It is 21°C and sunny in Paris.")])
    job = {"job_id": "xp-1", "agent": "weather", "messages": CONVERSATION, "tools": TOOLS}

    proc = _run_worker(tmp_path, upstream.url, redis_url, key_prefix, job)

    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    summary = [
        (e["type"], e.get("model") or e.get("to"), e.get("discard"))
        for e in events
        if e["type"] in ("attempt", "retry", "fallback", "completed")
    ]
    assert summary == [
        ("attempt", "gpt", None),
        ("fallback", "claude", False),
        ("attempt", "claude", None),
        ("retry", "claude", True),
        ("attempt", "claude", None),
        ("fallback", "gemini", False),
        ("attempt", "gemini", None),
        ("completed", "gemini", None),
    ]
    fallbacks = [e for e in events if e["type"] == "fallback"]
    assert [f["reason"] for f in fallbacks] == ["rate_limited", "retryable"]
    retry = next(e for e in events if e["type"] == "retry")
    assert retry["error"]["kind"] == "retryable"
    completed = events[-1]
    gemini_n = [e["n"] for e in events if e["type"] == "attempt"][-1]
    winning = "".join(e["text"] for e in events if e["type"] == "delta" and e["n"] == gemini_n)
    assert completed["text"] == winning == "It is 21°C and sunny in Paris."
    assert completed["finish_reason"] == "stop"
    assert completed["fallback_used"] is True
    assert [a["outcome"] for a in completed["attempts"]] == [
        "rate_limited",
        "retryable",
        "retryable",
        "ok",
    ]
    assert upstream.count("gpt-4o-mini") == 1
    assert upstream.count("claude-sonnet-4-5") == 2
    assert upstream.count("gemini-2.5-flash") == 1

    by_dialect = {r.dialect: r for r in upstream.requests}
    openai_body = by_dialect["openai"].body
    assert openai_body["messages"][2]["tool_calls"] == [
        {
            "id": "call_abc123",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]
    assert openai_body["messages"][3]["tool_call_id"] == "call_abc123"

    claude_bodies = [r.body for r in upstream.requests if r.dialect == "anthropic"]
    assert claude_bodies[0] == claude_bodies[1]
    claude_body = claude_bodies[0]
    assert claude_body["system"] == "You answer weather questions."
    assert claude_body["max_tokens"] == 1024
    assert claude_body["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "call_abc123",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                }
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "call_abc123",
                    "content": '{"temp_c": 21, "sky": "sunny"}',
                }
            ],
        },
    ]
    assert claude_body["tools"][0]["name"] == "get_weather"
    assert claude_body["tools"][0]["input_schema"]["required"] == ["city"]

    gemini_body = by_dialect["gemini"].body
    assert gemini_body["systemInstruction"] == {
        "parts": [{"text": "You answer weather questions."}]
    }
    assert [c["role"] for c in gemini_body["contents"]] == ["user", "model", "user"]
    assert gemini_body["contents"][1]["parts"][0]["functionCall"] == {
        "name": "get_weather",
        "args": {"city": "Paris"},
    }
    assert gemini_body["contents"][2]["parts"] == [
        {
            "functionResponse": {
                "name": "get_weather",
                "response": {"output": '{"temp_c": 21, "sky": "sunny"}'},
            }
        }
    ]
    declaration = gemini_body["tools"][0]["functionDeclarations"][0]
    assert declaration["name"] == "get_weather"
    assert "additionalProperties" not in declaration["parameters"]

    assert by_dialect["openai"].headers["authorization"] == mask(f"Bearer {KEYS['XP_OPENAI_KEY']}")
    assert by_dialect["anthropic"].headers["x-api-key"] == mask(KEYS["XP_ANTHROPIC_KEY"])
    assert by_dialect["anthropic"].headers["anthropic-version"] == "2023-06-01"
    assert by_dialect["gemini"].headers["x-goog-api-key"] == mask(KEYS["XP_GEMINI_KEY"])
    assert "x-api-key" not in by_dialect["gemini"].headers
    assert "x-goog-api-key" not in by_dialect["anthropic"].headers
    assert targets.seen == [
        "/v1/chat/completions",
        "/v1/messages",
        "/v1/messages",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
    ]
    recorded = repr(upstream.requests)
    for key in KEYS.values():
        assert key not in proc.stdout
        assert key not in proc.stderr
        assert key not in recorded
        assert all(key not in target for target in targets.seen)


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_tool_call_result_has_one_shape_whichever_provider_won(
    make_agents, make_job, make_executor, sink_for, mock, provider
):
    """A tool call comes back as {id, name, arguments} with finish tool_calls from any provider."""
    base = f"{mock.url}/v1" if provider == "openai" else mock.url
    agents = make_agents(
        models={"only": {"provider": provider, "base_url": base, "model": f"{provider}-tools"}},
        agents={"solo": {"model": "only", "retries": 0}},
    )
    call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    mock.script(f"{provider}-tools", [Reply(text="", tool_calls=(call,))])
    job = make_job(agent="solo", messages=CONVERSATION[:2], tools=TOOLS)

    outcome = make_executor().run(job, agents.agents["solo"], sink_for(job))

    result = outcome.terminal
    assert result["finish_reason"] == "tool_calls"
    assert result["text"] == ""
    assert [sorted(c) for c in result["tool_calls"]] == [["arguments", "id", "name"]]
    (made,) = result["tool_calls"]
    assert made["name"] == "get_weather"
    assert json.loads(made["arguments"]) == {"city": "Paris"}
    assert isinstance(made["id"], str)
    assert made["id"]
    assert sorted(result["usage"]) == ["input_tokens", "output_tokens", "total_tokens"]


def test_gemini_safety_block_completes_without_falling_back(
    make_agents, make_job, make_executor, sink_for, mock
):
    """A Gemini safety stop is a completed answer with finish content_filter; no fallback."""
    agents = make_agents(
        models={
            "gemini": {"provider": "gemini", "base_url": mock.url, "model": "gemini-safety"},
            "backup": {"provider": "openai", "base_url": f"{mock.url}/v1", "model": "backup"},
        },
        agents={"guarded": {"model": "gemini", "fallbacks": ["backup"]}},
    )
    mock.script("gemini-safety", [Reply(text="Here is how you", finish="SAFETY")])
    job = make_job(agent="guarded")
    sink = sink_for(job)

    outcome = make_executor().run(job, agents.agents["guarded"], sink)

    assert outcome.status == "completed"
    assert outcome.terminal["model"] == "gemini"
    assert outcome.terminal["finish_reason"] == "content_filter"
    assert outcome.terminal["text"] == "Here is how you"
    assert not [e for e in sink.events if e["type"] == "fallback"]
    assert mock.count("backup") == 0


def test_gemini_blocked_prompt_completes_empty_with_content_filter(
    make_agents, make_job, make_executor, sink_for, mock
):
    """A blocked prompt (promptFeedback.blockReason) completes with no text, content_filter."""
    agents = make_agents(
        models={"gemini": {"provider": "gemini", "base_url": mock.url, "model": "gemini-block"}},
        agents={"guarded": {"model": "gemini"}},
    )
    mock.script("gemini-block", [Reply(finish="prompt_blocked")])
    job = make_job(agent="guarded")

    outcome = make_executor().run(job, agents.agents["guarded"], sink_for(job))

    assert outcome.status == "completed"
    assert outcome.terminal["text"] == ""
    assert outcome.terminal["finish_reason"] == "content_filter"
    assert outcome.terminal["tool_calls"] == []
