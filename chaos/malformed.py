"""The malformed-message catalogue: what a broken client (or an attacker with the queue) can
push onto reliever's queue, each entry stored as kombu's Redis transport stores messages.

Each entry builds the raw queue entry for a task id. An entry *carries a task id* when it
is a JSON object whose ``headers.id`` is a string: by the promise that id is a job, which
must end with exactly one terminal event (a ``failed`` one for a message that cannot run).
The scenario pushes every entry followed by a valid job, which must complete, and no
worker may exit.
"""

from __future__ import annotations

import base64
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chaos.protocol import EMBED, body_json, envelope

FIVE_MB = 5 * 1024 * 1024


def valid_job(text: str = "hello") -> dict[str, Any]:
    return {"agent": "plain", "messages": [{"role": "user", "content": text}]}


Build = Callable[[str, str], bytes]
"""(queue, task id) -> the raw entry pushed onto the queue."""


@dataclass(frozen=True)
class Item:
    name: str
    what: str
    build: Build
    carries_id: bool = True


def _json(message: Any) -> bytes:
    return json.dumps(message).encode()


def _body(raw: bytes, **options: Any) -> Build:
    """An otherwise documented envelope around the body ``raw``."""
    return lambda queue, task_id: _json(envelope(raw, task_id=task_id, queue=queue, **options))


def _args(args: Any, kwargs: Any = None) -> Build:
    return _body(body_json(args, kwargs))


def _edited(edit: Callable[[dict[str, Any]], None]) -> Build:
    """The documented envelope of a valid job, changed by ``edit``."""

    def build(queue: str, task_id: str) -> bytes:
        message = envelope(body_json([valid_job()]), task_id=task_id, queue=queue)
        edit(message)
        return _json(message)

    return build


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _deep_object(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"d": value}
    return value


CATALOGUE: tuple[Item, ...] = (
    Item("body-object", "the body is the job object, not [args, kwargs, embed]",
         _body(_json(valid_job()))),
    Item("body-number", "the body is the JSON number 42", _body(b"42")),
    Item("body-null", "the body is JSON null", _body(b"null")),
    Item("args-object", "args is an object, not a list", _args(valid_job())),
    Item("two-args", "two positional arguments", _args([valid_job(), valid_job()])),
    Item("no-args", "no argument at all", _args([])),
    Item("unknown-kwarg", "the job plus an unknown keyword argument",
         _args([valid_job()], {"nope": 1})),
    Item("body-empty", "an empty body", _body(b"")),
    Item("body-binary", "1 KB of bytes that are not UTF-8, labelled JSON",
         _body(bytes(range(256)) * 4)),
    Item("body-5mb-text", "5 MB of text that is not JSON",
         _body(b"lorem ipsum " * (FIVE_MB // 12))),
    Item("body-not-base64", "a body that is not base64 although body_encoding says so",
         _edited(lambda m: m.update(body="%%% not base64 %%%"))),
    Item("body-encoding-missing", "no body_encoding: the base64 text is taken as the body",
         _edited(lambda m: m["properties"].pop("body_encoding"))),
    Item("content-encoding-utf16", "a UTF-8 body labelled utf-16",
         _body(body_json([valid_job()]), content_encoding="utf-16")),
    Item("pickle", "content-type application/x-python-serialize (pickle)",
         _body(pickle.dumps(((valid_job(),), {}, EMBED)),
               content_type="application/x-python-serialize", content_encoding="binary")),
    Item("unknown-content-type", "content-type application/x-chaos",
         _body(body_json([valid_job()]), content_type="application/x-chaos")),
    Item("unknown-task", "task name reliever.nope", _body(body_json([valid_job()]),
                                                            task="reliever.nope")),
    Item("huge-job", "a valid-shaped job of 5 MB (over MAX_JOB_BYTES)",
         _args([valid_job("x" * FIVE_MB)])),
    Item("deep-body", "JSON nested 100,000 deep",
         _body(f"[[{_deep(100_000)}], {{}}, {{}}]".encode())),
    Item("deep-job", "a job whose metadata nests 500 objects deep",
         _args([{**valid_job(), "metadata": _deep_object(500)}])),
    Item("nan-deadline", "the JSON literal NaN as deadline_s",
         _args([{**valid_job(), "deadline_s": float("nan")}])),
    Item("job-is-list", "the job is a list of strings", _args([["not", "a", "job"]])),
    Item("job-is-string", "the job is a string", _args(["hello"])),
    Item("job-wrong-types", "agent a number, messages a string",
         _args([{"agent": 7, "messages": "hello"}])),
    Item("no-id", "no task id in headers or properties",
         lambda queue, _id: _json(envelope(body_json([valid_job()]), task_id=None, queue=queue)),
         carries_id=False),
    Item("id-not-a-string", "the task id is a number",
         _edited(lambda m: m["headers"].update(id=12345, root_id=12345)), carries_id=False),
    Item("headers-not-object", "headers is a string",
         _edited(lambda m: m.update(headers="nope")), carries_id=False),
    Item("no-properties", "no properties (no delivery tag, no delivery info)",
         _edited(lambda m: m.pop("properties"))),
    Item("no-delivery-tag", "properties without delivery_tag",
         _edited(lambda m: m["properties"].pop("delivery_tag"))),
    Item("envelope-not-json", "a queue entry that is not JSON",
         lambda _q, _id: b"this is not a kombu message", carries_id=False),
    Item("envelope-array", "a queue entry that is a JSON array",
         lambda _q, _id: b"[1, 2, 3]", carries_id=False),
    Item("envelope-base64-body-only", "a JSON object with only a body",
         lambda _q, _id: _json({"body": base64.b64encode(body_json([valid_job()])).decode()}),
         carries_id=False),
)  # fmt: skip


def by_name(names: list[str] | None) -> tuple[Item, ...]:
    """The catalogue's entries named (all of them for None).

    Raises:
        KeyError: a name is not in the catalogue.
    """
    if names is None:
        return CATALOGUE
    known = {item.name: item for item in CATALOGUE}
    return tuple(known[name] for name in names)
