"""The job: the one JSON argument of ``reliever.complete``, validated at the edge.

A job names an agent, never a URL or a key. Whatever is wrong with a payload becomes one
:class:`~worker.errors.InvalidJob` whose message names the field (``messages[0].role``);
nothing from the payload's content is echoed back into it.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from worker.errors import InvalidJob

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ToolCall(_Strict):
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=128)
    arguments: str = ""


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[ToolCall] = []
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
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    params: Params = Params()
    deadline_s: float | None = Field(None, gt=0)
    metadata: dict[str, Any] | None = None

    def params_dict(self) -> dict[str, Any]:
        return self.params.model_dump(exclude_none=True)

    def messages_list(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]

    def tools_list(self) -> list[dict[str, Any]] | None:
        return None if self.tools is None else [t.model_dump() for t in self.tools]


def _field(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(job)"


def job_size(raw: Any) -> int:
    """The payload's size in bytes as JSON."""
    return len(json.dumps(raw, separators=(",", ":"), default=str).encode())


def parse_job(raw: Any, *, max_bytes: int) -> Job:
    """Validate a job payload.

    Raises:
        InvalidJob: oversize, not an object, or a field is wrong (the message names it).
    """
    if not isinstance(raw, dict):
        raise InvalidJob("the job must be a JSON object", field="(job)")
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
