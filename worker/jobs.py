"""The job: the one JSON argument of ``reliever.complete``, validated at the edge.

A job names an agent, never a URL or a key. Whatever is wrong with a payload becomes one
:class:`~worker.errors.InvalidJob` whose message names the field (``messages[0].role``);
nothing from the payload's content is echoed back into it.

Before the schema is checked, the payload is walked once, without recursion, for what
would break later on: nesting deeper than :data:`MAX_DEPTH`, a string that is not valid
UTF-8 (a lone surrogate), a number JSON cannot carry (``inf``, ``nan``, an integer
beyond 64 bits), a value that is not JSON at all. A job that passes can be encoded as
every provider's request.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from worker.errors import InvalidJob

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
"""A job id; match it with :func:`is_job_id` (in full: ``$`` alone lets a newline end it)."""
_JOB_ID = re.compile(JOB_ID_PATTERN)

MAX_DEPTH = 64
"""How deeply a job's JSON may nest (the job object is level 1; a tool's ``parameters``
schema gets about 60 levels)."""
MAX_DEADLINE_S = 86_400.0
"""The longest ``deadline_s``: a day, the default life of a job's replay log."""
MAX_MESSAGES = 10_000
MAX_TOOLS = 512
MAX_TOOL_CALLS = 512
"""Tool calls of one assistant message."""
MAX_INT = 2**64
"""Integers must lie strictly between ``-MAX_INT`` and ``MAX_INT`` (64 bits, signed or not)."""

_SURROGATE = re.compile("[\ud800-\udfff]")
_PRINTABLE_KEY = re.compile(r"[\x21-\x7e]{1,64}")


def is_job_id(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a usable job id, matched in full."""
    return isinstance(value, str) and _JOB_ID.fullmatch(value) is not None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ToolCall(_Strict):
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=128)
    arguments: str = ""


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[ToolCall] = Field([], max_length=MAX_TOOL_CALLS)
    tool_call_id: str | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _shape(self) -> Message:
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id")
        if self.role != "assistant" and self.tool_calls:
            raise ValueError("only assistant messages carry tool_calls")
        if self.content is None and not self.tool_calls:
            raise ValueError("content is required")
        return self


class Tool(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] = {}


class Params(_Strict):
    max_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None


class Job(_Strict):
    job_id: str = Field(default_factory=lambda: str(uuid.uuid4()), pattern=JOB_ID_PATTERN)
    agent: str = Field(min_length=1, max_length=128)
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    params: Params = Params()
    deadline_s: float | None = Field(None, gt=0, le=MAX_DEADLINE_S)
    metadata: dict[str, Any] | None = None

    def params_dict(self) -> dict[str, Any]:
        return self.params.model_dump(exclude_none=True)

    def messages_list(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]

    def tools_list(self) -> list[dict[str, Any]] | None:
        return None if self.tools is None else [t.model_dump() for t in self.tools]


JsonPath = tuple[int | str, ...]


@dataclass(frozen=True, slots=True)
class JsonProblem:
    """Why a value cannot be sent as JSON, and where (keys and indexes from the top)."""

    path: JsonPath
    what: str


def json_problem(value: Any, *, max_depth: int = MAX_DEPTH) -> JsonProblem | None:
    """The first thing, in document order, that keeps ``value`` from being sent as JSON.

    Walks ``value`` with a stack of its own, so no nesting can exhaust Python's: objects
    and arrays nested deeper than ``max_depth`` (``value`` itself is level 1), strings
    and keys that are not valid UTF-8, ``inf`` and ``nan``, integers of ``MAX_INT`` or
    more in magnitude, keys that are not strings, and values that are not JSON (``bytes``,
    a ``datetime`` …). Tuples count as arrays. None when there is no such thing.
    """
    stack: list[tuple[Any, JsonPath, int]] = [(value, (), 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return JsonProblem(path, "not valid UTF-8 (a lone surrogate)")
        elif item is None or isinstance(item, bool):
            continue
        elif isinstance(item, int):
            if not -MAX_INT < item < MAX_INT:
                return JsonProblem(path, "an integer beyond 64 bits")
        elif isinstance(item, float):
            if not math.isfinite(item):
                return JsonProblem(path, "not a finite number")
        elif isinstance(item, dict | list | tuple):
            if depth > max_depth:
                return JsonProblem(path, f"nested deeper than {max_depth} levels")
            if isinstance(item, dict):
                children: list[tuple[int | str, Any]] = []
                for key, child in item.items():
                    if not isinstance(key, str):
                        return JsonProblem(path, "an object key is not a string")
                    if _SURROGATE.search(key):
                        return JsonProblem(path, "an object key is not valid UTF-8")
                    children.append((key, child))
            else:
                children = list(enumerate(item))
            stack.extend((child, (*path, key), depth + 1) for key, child in reversed(children))
        else:
            return JsonProblem(path, f"not a JSON value ({type(item).__name__})")
    return None


def _named(path: JsonPath) -> JsonPath:
    """The part of ``path`` an error names: inside ``metadata`` or a tool's ``parameters``
    the keys are the sender's own data, so the path stops at that field."""
    if path[:1] == ("metadata",):
        return path[:1]
    if len(path) > 3 and path[0] == "tools" and path[2] == "parameters":
        return path[:3]
    return path


def _field(loc: JsonPath) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        name = part if _PRINTABLE_KEY.fullmatch(part) else "(key)"
        out += f".{name}" if out else name
    return out or "(job)"


def job_size(raw: Any) -> int:
    """The size in bytes of a payload :func:`json_problem` passed, as JSON."""
    return len(json.dumps(raw, separators=(",", ":")).encode())


def parse_job(raw: Any, *, max_bytes: int) -> Job:
    """Validate a job payload.

    Raises:
        InvalidJob: not an object, not sendable as JSON (see :func:`json_problem`),
            oversize, or a field is wrong (the message names it).
    """
    if not isinstance(raw, dict):
        raise InvalidJob("the job must be a JSON object", field="(job)")
    problem = json_problem(raw)
    if problem is not None:
        field = _field(_named(problem.path))
        raise InvalidJob(f"{field}: {problem.what}", field=field)
    size = job_size(raw)
    if size > max_bytes:
        raise InvalidJob(f"the job is {size} bytes, over the limit of {max_bytes}", field="(job)")
    try:
        return Job.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = _field(first["loc"])
        more = len(exc.errors()) - 1
        extra = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise InvalidJob(f"{field}: {first['msg']}{extra}", field=field) from None
