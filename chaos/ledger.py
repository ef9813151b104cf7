"""Job accounting: the jobs a scenario submitted, their terminal events, and each job's
replay log judged against the promise.

The promise (README, "Jobs and events"): every job ends with exactly one terminal event
(``completed`` or ``failed``), its events numbered 1, 2, 3 … with no gap and no repeat,
across reruns too. A rerun (after a lost worker or a hand-off) starts with ``restarted``
and its own ``started``; from then on only the rerun writes: its attempt numbers ``n``
continue after the lost run's, so an event of the lost run after the ``restarted`` shows
as an ``n`` that is not the rerun's. Nothing follows the terminal event.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from chaos import protocol

TERMINAL = frozenset({"completed", "failed"})
POLL_S = 0.25
QUIET_S = 45.0
"""How long no job's log may grow before waiting gives up: three default lease TTLs, so a
job whose worker was lost has been reaped and rerun well before."""
_PIPELINE = 200


@dataclass
class Verdict:
    """One job's replay log, judged."""

    job_id: str
    events: int = 0
    terminals: int = 0
    outcome: str | None = None
    """``completed`` or ``failed:<kind>`` of the first terminal event."""
    gap: str | None = None
    """What breaks the seq (1, 2, 3 … matching the entries' ``s``), if anything."""
    interleaved: str | None = None
    """What shows two runs' events mixed, or events after the terminal one, if anything."""
    text_mismatch: str | None = None
    """How ``completed.text`` differs from the text deltas of the attempt that won."""
    restarted: int = 0
    stamps: list[float] = field(default_factory=list)
    """When each event was stored (its entry id's milliseconds: Redis's clock, which is
    this machine's), the moment a reader could see it."""
    terminal_at: float | None = None

    @property
    def ended(self) -> bool:
        return self.terminals > 0


def judge(job_id: str, entries: Iterable[tuple[Any, Mapping[bytes, bytes]]]) -> Verdict:
    """Judge a job's replay log (its XRANGE entries)."""
    verdict = Verdict(job_id)
    events: list[dict[str, Any]] = []
    for position, (entry_id, fields) in enumerate(entries, start=1):
        try:
            event = json.loads(fields[b"e"])
            seq = int(fields[b"s"])
        except (KeyError, ValueError, TypeError):
            verdict.gap = verdict.gap or f"entry {position}: no readable s/e fields"
            continue
        if verdict.gap is None and (seq != position or event.get("seq") != position):
            verdict.gap = f"entry {position}: s={seq}, seq={event.get('seq')}"
        if verdict.gap is None and event.get("job_id") != job_id:
            verdict.gap = f"entry {position}: job_id {event.get('job_id')!r}"
        events.append(event)
        verdict.stamps.append(_stored_at(entry_id))
    verdict.events = len(events)
    for event, stored_at in zip(events, verdict.stamps, strict=True):
        if event.get("type") in TERMINAL:
            verdict.terminals += 1
            if verdict.outcome is None:
                verdict.terminal_at = stored_at
                kind = (event.get("error") or {}).get("kind") if event["type"] == "failed" else None
                verdict.outcome = event["type"] if kind is None else f"failed:{kind}"
    verdict.restarted = sum(1 for e in events if e.get("type") == "restarted")
    verdict.interleaved = _interleaving(events)
    verdict.text_mismatch = _text_mismatch(events)
    return verdict


def _stored_at(entry_id: Any) -> float:
    """The epoch seconds of a stream entry id (``<ms>-<n>``)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text.split("-", 1)[0]) / 1000


def _text_mismatch(events: list[dict[str, Any]]) -> str | None:
    """For a completed job: whether its text deltas of the winning attempt (the last
    ``attempt`` before ``completed``) add up to ``completed.text``, as a reader rebuilds it."""
    ends = [i for i, e in enumerate(events) if e.get("type") == "completed"]
    if not ends:
        return None
    attempts = [e for e in events[: ends[0]] if e.get("type") == "attempt"]
    if not attempts:
        return "completed without an attempt"
    final = attempts[-1].get("n")
    deltas = [e for e in events[: ends[0]] if e.get("type") == "delta" and e.get("n") == final]
    if any("text" not in d for d in deltas):
        return None  # tool calls: streamed in pieces, not compared here
    text = "".join(str(d.get("text", "")) for d in deltas)
    expected = str(events[ends[0]].get("text"))
    if text == expected:
        return None
    at = next((i for i, (a, b) in enumerate(zip(text, expected, strict=False)) if a != b), None)
    at = min(len(text), len(expected)) if at is None else at
    return (
        f"deltas give {len(text)} chars, completed.text {len(expected)}; first difference at {at}"
    )


def _interleaving(events: list[dict[str, Any]]) -> str | None:
    """Why the log is not one run after another (each rerun after its ``restarted``)."""
    first_terminal = next((i for i, e in enumerate(events) if e.get("type") in TERMINAL), None)
    if first_terminal is not None and first_terminal < len(events) - 1:
        after = [e.get("type") for e in events[first_terminal + 1 :]]
        return f"{len(after)} event(s) after the terminal one: {after[:5]}"
    runs: list[list[dict[str, Any]]] = [[]]
    for event in events:
        if event.get("type") == "restarted":
            runs.append([])
        runs[-1].append(event)
    earlier_n = 0
    for number, run in enumerate(runs):
        kinds = [e.get("type") for e in run]
        starts = [i for i, kind in enumerate(kinds) if kind == "started"]
        opening = 0 if number == 0 else 1
        if len(starts) > 1 or (starts and starts[0] != opening):
            return f"run {number}: 'started' at {starts} of {kinds[:8]}"
        attempts = {e.get("n") for e in run if e.get("type") == "attempt"}
        for event in run:
            n = event.get("n")
            if not isinstance(n, int):
                continue
            if n <= earlier_n:
                return f"run {number}: {event.get('type')} n={n} after the rerun (n > {earlier_n})"
            if event.get("type") != "attempt" and n not in attempts:
                return f"run {number}: {event.get('type')} n={n} of no attempt of this run"
        earlier_n = max([earlier_n, *(n for n in attempts if isinstance(n, int))])
    return None


@dataclass(frozen=True)
class Fault:
    """A fault the scenario injected: from ``start`` to ``end`` (epoch seconds)."""

    label: str
    start: float
    end: float


def recovery(faults: Iterable[Fault], verdicts: Iterable[Verdict]) -> tuple[float | None, int]:
    """The longest time, over faults, from a fault's end until the last job that was in
    flight at its start made progress again (its next event stored, or a rerun's); and how
    many such jobs never did."""
    verdicts = list(verdicts)
    worst: float | None = None
    stuck = 0
    for fault in faults:
        for v in verdicts:
            if not v.stamps or v.stamps[0] >= fault.start:
                continue
            if v.terminal_at is not None and v.terminal_at <= fault.start:
                continue
            later = next((ts for ts in v.stamps if ts > fault.end), None)
            if later is None:
                stuck += 1
                continue
            worst = max(worst or 0.0, later - fault.end)
    return worst, stuck


class Ledger:
    """The jobs of a scenario, followed through their replay logs.

    Args:
        client: the scenario's Redis (commands may fail while a fault is on: polls retry).
        prefix: the key prefix.
        queue: the job queue.
    """

    def __init__(self, client: redis.Redis, prefix: str, queue: str) -> None:
        self.client = client
        self.prefix = prefix
        self.queue = queue
        self.labels: dict[str, str] = {}
        """job id -> what kind of job it is (for the report)."""
        self._cursor: dict[str, str] = {}
        self._done: set[str] = set()
        self._seen: dict[str, list[Any]] = {}
        self.expired = 0
        """Logs gone (their TTL) when judged: judged from what polls read while they lived."""
        self._progress_at = time.monotonic()
        self.wait_errors = 0

    def add(self, job_id: str, label: str) -> str:
        if job_id in self.labels:
            raise ValueError(f"job id {job_id!r} submitted twice")
        self.labels[job_id] = label
        return job_id

    def submit(self, job: Any, label: str, task_id: str) -> str:
        """Enqueue ``job`` by the documented protocol; its job id."""
        job_id = protocol.expected_job_id(job, task_id)
        self.add(job_id, label)
        protocol.submit(self.client, self.queue, job, task_id)
        return job_id

    def pending(self) -> list[str]:
        return [j for j in self.labels if j not in self._done]

    def poll(self) -> int:
        """Read what is new in each unfinished job's log; how many jobs are still pending."""
        pending = self.pending()
        for start in range(0, len(pending), _PIPELINE):
            batch = pending[start : start + _PIPELINE]
            pipe = self.client.pipeline(transaction=False)
            for job_id in batch:
                after = self._cursor.get(job_id)
                low = "-" if after is None else f"({after}"
                pipe.xrange(protocol.log_key(self.prefix, job_id), low, "+", count=1000)
            for job_id, entries in zip(batch, pipe.execute(), strict=True):
                self._seen.setdefault(job_id, []).extend(entries)
                for entry_id, fields in entries:
                    self._progress_at = time.monotonic()
                    self._cursor[job_id] = entry_id.decode()
                    if _is_terminal(fields):
                        self._done.add(job_id)
        return len(self.pending())

    def wait(self, timeout_s: float, *, quiet_s: float = QUIET_S) -> bool:
        """Poll until every job has its terminal event; True if all did.

        Gives up after ``timeout_s``, or once no log has grown for ``quiet_s`` (longer than
        a lost job takes to be rerun). Redis errors (a fault in progress) are counted and
        polled through.
        """
        now = time.monotonic()
        ends = now + timeout_s
        self._progress_at = now
        while True:
            try:
                if self.poll() == 0:
                    return True
            except redis.RedisError:
                self.wait_errors += 1
            now = time.monotonic()
            if now >= ends or now - self._progress_at >= quiet_s:
                return False
            time.sleep(POLL_S)

    def wait_for(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Poll ``done`` (Redis errors count as not yet) until true or ``timeout_s``."""
        ends = time.monotonic() + timeout_s
        while True:
            try:
                if done():
                    return True
            except redis.RedisError:
                self.wait_errors += 1
            if time.monotonic() >= ends:
                return False
            time.sleep(POLL_S)

    def has_events(self, job_id: str) -> bool:
        """Whether the job published an event (as of the last poll)."""
        return job_id in self._cursor

    def verdicts(self) -> dict[str, Verdict]:
        """Every job's whole log, judged: read afresh (late writes count too), or as polls
        read it when it has expired since."""
        out: dict[str, Verdict] = {}
        ids = list(self.labels)
        self.expired = 0
        for start in range(0, len(ids), _PIPELINE):
            batch = ids[start : start + _PIPELINE]
            pipe = self.client.pipeline(transaction=False)
            for job_id in batch:
                pipe.xrange(protocol.log_key(self.prefix, job_id))
            for job_id, entries in zip(batch, pipe.execute(), strict=True):
                seen = self._seen.get(job_id, [])
                if len(entries) < len(seen):
                    self.expired += 1
                    entries = seen
                out[job_id] = judge(job_id, entries)
        return out

    def whereabouts(self, job_ids: Iterable[str]) -> dict[str, str]:
        """Where each job (without a terminal event) is: still queued, unacked in kombu's
        hash (it waits for the visibility timeout), listed as running, its lease, and the
        state Celery stored for its task."""
        job_ids = list(job_ids)
        if not job_ids:
            return {}
        client = self.client
        queued = {_message_id(_loads(raw)) for raw in client.lrange(self.queue, 0, -1)}
        unacked = {_message_id(_unacked_message(raw)) for raw in client.hvals("unacked")}
        running = {k.decode() for k in client.hkeys(f"{self.prefix}:running")}
        out = {}
        for job_id in job_ids:
            places = []
            if job_id in queued:
                places.append("queued")
            if job_id in unacked:
                places.append("unacked")
            if job_id in running:
                places.append("listed-running")
            if client.exists(f"{self.prefix}:lease:{job_id}"):
                places.append("leased")
            meta = client.get(f"celery-task-meta-{job_id}")
            if meta is not None:
                places.append(f"celery:{_celery_state(meta)}")
            out[job_id] = ", ".join(places) or "nowhere"
        return out


def _is_terminal(fields: Mapping[bytes, bytes]) -> bool:
    try:
        return json.loads(fields[b"e"]).get("type") in TERMINAL
    except (KeyError, ValueError, AttributeError):
        return False


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _unacked_message(raw: bytes) -> Any:
    """The message of an entry of kombu's ``unacked`` hash: [message, exchange, routing key]."""
    value = _loads(raw)
    return value[0] if isinstance(value, list) and value else None


def _message_id(message: Any) -> str | None:
    """The task id in a stored message's headers, if it has one."""
    headers = message.get("headers") if isinstance(message, dict) else None
    task_id = headers.get("id") if isinstance(headers, dict) else None
    return task_id if isinstance(task_id, str) else None


def _celery_state(meta: bytes) -> str:
    try:
        data = json.loads(meta)
    except ValueError:
        return "unreadable"
    state = str(data.get("status"))
    result = data.get("result")
    if state == "FAILURE" and isinstance(result, dict):
        message = str(result.get("exc_message"))[:120]
        return f"FAILURE {result.get('exc_type')}: {message}"
    return state
