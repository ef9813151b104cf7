"""Helpers every adapter uses to read the design's neutral messages and params.

A neutral tool call carries its arguments as a JSON string (OpenAI's form); Anthropic and
Gemini want the object itself. A job's ``stop`` is a string or a list of strings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from worker.errors import FatalError
from worker.jobs import json_problem


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def tool_input(arguments: str, where: str) -> dict[str, Any]:
    """A tool call's JSON ``arguments`` string as the object Anthropic and Gemini want.

    Empty arguments are the empty object.

    Raises:
        FatalError: the arguments are not a JSON object, or not one a request can carry
            (``NaN``, nesting deeper than the job's limit …); no provider but OpenAI
            takes them as a string, so the request cannot be sent (the message names
            ``where``, never the content).
    """
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise FatalError(f"{where}: tool call arguments are not valid JSON") from None
    if not isinstance(value, dict):
        raise FatalError(f"{where}: tool call arguments are not a JSON object")
    problem = json_problem(value)
    if problem is not None:
        raise FatalError(f"{where}: tool call arguments: {problem.what}")
    return value


def compact_json(value: Any) -> str:
    """``value`` as compact JSON, the way OpenAI streams tool-call arguments."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def stop_list(params: Mapping[str, Any]) -> list[str]:
    """The job's ``stop`` param as a list (empty when unset)."""
    stop = params.get("stop")
    if not stop:
        return []
    return [stop] if isinstance(stop, str) else [str(s) for s in stop]
