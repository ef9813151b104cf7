"""A seeded generator of hostile jobs over the job schema (README, "Jobs and events").

Each job starts as a valid one and takes zero to three mutations: infinite, NaN and huge
numbers where numbers go (``deadline_s`` of ``inf``, ``nan`` or ``1e19``), wrong types
everywhere, lone surrogates, control characters, huge strings, deep nesting, unknown
fields, ids that are not ids, a top level that is not an object. The same seed gives the
same jobs. Python's ``json`` writes them (NaN and Infinity as its literals, lone
surrogates escaped), as a sender in any language could.

Whatever a job is, it must end with exactly one terminal event.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any

INF = float("inf")
NAN = float("nan")

NUMBERS: tuple[Any, ...] = (
    INF, -INF, NAN, 1e19, -1e19, 1e308, 5e-324, 0, -0.0, -1, 1e-9, 0.001, 2**63, 2**64,
    10**30, -(2**63) - 1, True, False, "10", None,
)  # fmt: skip
STRINGS: tuple[str, ...] = (
    "", " ", "\x00", "\x00" * 64, "\ud800", "a\udfffb", "\udc00\ud800", "\u202eevil", "\ufeff",
    "😀" * 500, "\x1b[31mred\x1b[0m", "\r\n\r\n", "\x07\x08\x7f", "' OR 1=1 --", "{{7*7}}",
    "%s%n%x", "../../etc/passwd", "null", "NaN", "𝕏" * 10, "\u0000\u0001\u001f", "\\u0000",
    "data: [DONE]\n\n", "<script>alert(1)</script>",
)  # fmt: skip
WRONG_TYPES: tuple[Any, ...] = (None, [], {}, 1, 1.5, True, "str", [[]], {"a": {}}, [None])
HUGE_SIZES = (20_000, 200_000, 999_000, 1_200_000)


def _string(rng: random.Random) -> str:
    if rng.random() < 0.04:
        return rng.choice("ab😀\x00") * rng.choice(HUGE_SIZES)
    return rng.choice(STRINGS)


def _any(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.35:
        return _string(rng)
    if roll < 0.65:
        return rng.choice(NUMBERS)
    if roll < 0.9:
        return copy.deepcopy(rng.choice(WRONG_TYPES))
    return _nested(rng)


def _nested(rng: random.Random) -> Any:
    depth = rng.choice((10, 100, 400, 800))
    value: Any = rng.choice(NUMBERS)
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


def valid(rng: random.Random) -> dict[str, Any]:
    job: dict[str, Any] = {
        "agent": "plain",
        "messages": [{"role": "user", "content": f"fuzz {rng.randrange(10**6)}"}],
    }
    if rng.random() < 0.3:
        job["params"] = {"max_tokens": rng.randrange(1, 512), "temperature": 0.5}
    return job


Mutation = Callable[[random.Random, dict[str, Any]], None]


def _deadline(rng: random.Random, job: dict[str, Any]) -> None:
    job["deadline_s"] = rng.choice((*NUMBERS, INF, NAN, 1e19))


def _content(rng: random.Random, job: dict[str, Any]) -> None:
    job["messages"][0]["content"] = _string(rng) if rng.random() < 0.7 else _any(rng)


def _role(rng: random.Random, job: dict[str, Any]) -> None:
    job["messages"][0]["role"] = (
        _any(rng) if rng.random() < 0.6 else rng.choice(("assistant", "system", "tool", "USER"))
    )


def _messages(rng: random.Random, job: dict[str, Any]) -> None:
    choice = rng.randrange(7)
    if choice == 0:
        job["messages"] = []
    elif choice == 1:
        job["messages"] = _any(rng)
    elif choice == 2:
        job["messages"] = [{"role": "user", "content": "m"} for _ in range(rng.choice((500, 5000)))]
    elif choice == 3:
        job["messages"][0][_string(rng)[:50] or "x"] = _any(rng)
    elif choice == 4:
        job["messages"].append({"role": "tool", "content": "r"})
    elif choice == 5:
        job["messages"].append({"role": "assistant", "content": None, "tool_calls": _any(rng)})
    else:
        call = {"id": _string(rng), "name": _string(rng), "arguments": _any(rng)}
        job["messages"].append({"role": "assistant", "tool_calls": [call]})


def _agent(rng: random.Random, job: dict[str, Any]) -> None:
    job["agent"] = _any(rng) if rng.random() < 0.7 else "no-such-agent"


def _params(rng: random.Random, job: dict[str, Any]) -> None:
    name = rng.choice(("max_tokens", "temperature", "top_p", "stop", "seed", "logit_bias"))
    params = job.setdefault("params", {})
    params[name] = _any(rng) if name != "stop" or rng.random() < 0.5 else [_any(rng)]
    if rng.random() < 0.2:
        job["params"] = _any(rng)


def _tools(rng: random.Random, job: dict[str, Any]) -> None:
    tool = {"name": rng.choice((_string(rng), "lookup")), "description": _string(rng)}
    tool["parameters"] = _nested(rng) if rng.random() < 0.5 else _any(rng)
    job["tools"] = [tool] if rng.random() < 0.8 else _any(rng)


def _metadata(rng: random.Random, job: dict[str, Any]) -> None:
    job["metadata"] = {"nested": _nested(rng), "n": rng.choice(NUMBERS), "s": _string(rng)}
    if rng.random() < 0.2:
        job["metadata"] = _any(rng)


def _job_id(rng: random.Random, job: dict[str, Any]) -> None:
    job["job_id"] = _any(rng)


def _extra(rng: random.Random, job: dict[str, Any]) -> None:
    job[rng.choice(("priority", "model", "stream", "__proto__", "", "agent "))] = _any(rng)


MUTATIONS: dict[str, Mutation] = {
    "deadline": _deadline,
    "content": _content,
    "role": _role,
    "messages": _messages,
    "agent": _agent,
    "params": _params,
    "tools": _tools,
    "metadata": _metadata,
    "job_id": _job_id,
    "extra": _extra,
}


def generate(count: int, seed: int) -> list[tuple[str, Any]]:
    """``count`` jobs as (label, job): the label names the mutations applied."""
    rng = random.Random(seed)
    out: list[tuple[str, Any]] = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.03:
            out.append(("not-an-object", _any(rng)))
            continue
        job = valid(rng)
        if roll < 0.15:
            out.append(("valid", job))
            continue
        chosen = set(rng.sample(list(MUTATIONS), rng.choice((1, 1, 2, 3))))
        # In the table's order: the first message is changed before the list is replaced.
        names = [name for name in MUTATIONS if name in chosen]
        for name in names:
            MUTATIONS[name](rng, job)
        out.append(("+".join(names), job))
    return out
