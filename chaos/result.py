"""A scenario's result: the counts behind the promise, its own checks, and the evidence.

A scenario passes when no job was lost, none has two terminal events, none lacks one,
every seq is gapless, no rerun's log mixes two runs, every completed job's deltas add up
to its text, no worker exited on its own, and the scenario's own checks (RSS bound,
canaries, TTLs …) hold.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from chaos.ledger import QUIET_S, Fault, Ledger, Verdict, recovery
from chaos.rig import Rig

EXAMPLES = 5
"""Job ids shown per problem."""
LOG_LINES = 15
"""Distinct notable worker log lines kept per scenario."""


@dataclass
class Check:
    """A scenario's own pass criterion."""

    name: str
    ok: bool
    detail: str = ""


@dataclass
class Result:
    scenario: str
    jobs: int = 0
    lost: int = 0
    """Jobs with no event at all by the end plus the grace: their message vanished."""
    duplicate_terminals: int = 0
    """Jobs with more than one terminal event."""
    no_terminal: int = 0
    """Jobs that published events but no terminal one by the end plus the grace."""
    seq_gaps: int = 0
    """Jobs whose seq is not 1, 2, 3 … (a gap, a repeat, or s and seq disagreeing)."""
    interleaved: int = 0
    """Jobs whose log mixes two runs, or has events after its terminal one."""
    text_mismatch: int = 0
    """Completed jobs whose winning attempt's text deltas do not add up to their text: a
    reader following the log would miss (or get extra) text although the seq is whole."""
    worker_exits: int = 0
    """Workers that exited without the harness telling them to."""
    restarted: int = 0
    """Jobs that were rerun (a ``restarted`` event): what the faults exercised."""
    recovery_s: float | None = None
    """Longest time from a fault's end until every job in flight at its start moved again."""
    elapsed_s: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=dict)
    exits: list[dict[str, Any]] = field(default_factory=list)
    log_excerpt: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    """The harness itself could not run the scenario."""
    log_dir: str = ""

    @property
    def passed(self) -> bool:
        return not self.failures()

    def failures(self) -> list[str]:
        """Why the scenario failed, one reason a line (empty when it passed)."""
        out = []
        if self.error is not None:
            out.append(f"harness error: {self.error}")
        counts = {
            "lost": self.lost,
            "duplicate terminals": self.duplicate_terminals,
            "no terminal": self.no_terminal,
            "seq gaps": self.seq_gaps,
            "interleaved": self.interleaved,
            "text mismatch": self.text_mismatch,
            "unexpected worker exits": self.worker_exits,
        }
        out += [f"{name}: {n}" for name, n in counts.items() if n]
        out += [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]
        return out

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        data["failures"] = self.failures()
        return data


def tally(
    result: Result,
    rig: Rig,
    ledger: Ledger,
    *,
    grace_s: float,
    quiet_s: float = QUIET_S,
    faults: Iterable[Fault] = (),
    job_ids: Iterable[str] | None = None,
) -> dict[str, Verdict]:
    """Wait up to ``grace_s`` (or until no log grew for ``quiet_s``) for every job's
    terminal event, then count what the promise
    forbids (over ``job_ids``, all of the ledger's by default), note where the jobs without
    a terminal event are, and collect the worker exits and notable log lines."""
    ledger.wait(grace_s, quiet_s=quiet_s)
    verdicts = ledger.verdicts()
    judged = [verdicts[j] for j in (job_ids if job_ids is not None else verdicts)]
    result.jobs = len(judged)
    lost = [v.job_id for v in judged if v.events == 0]
    unended = [v.job_id for v in judged if v.events and not v.ended]
    result.lost, result.no_terminal = len(lost), len(unended)
    dups = [v for v in judged if v.terminals > 1]
    gaps = [v for v in judged if v.gap is not None]
    mixed = [v for v in judged if v.interleaved is not None]
    torn = [v for v in judged if v.text_mismatch is not None]
    result.text_mismatch = len(torn)
    result.duplicate_terminals, result.seq_gaps = len(dups), len(gaps)
    result.interleaved = len(mixed)
    result.restarted = sum(1 for v in judged if v.restarted)
    result.outcomes = dict(Counter(v.outcome or "none" for v in judged).most_common())
    where = ledger.whereabouts((lost + unended)[: EXAMPLES * 4])

    def label(job_id: str) -> str:
        return f"{job_id} [{ledger.labels.get(job_id, '?')}]"

    if lost:
        result.examples["lost"] = [f"{label(j)}: {where.get(j, '?')}" for j in lost[:EXAMPLES]]
    if unended:
        result.examples["no terminal"] = [
            f"{label(j)}: {where.get(j, '?')}" for j in unended[:EXAMPLES]
        ]
    if dups:
        result.examples["duplicate terminals"] = [
            f"{label(v.job_id)}: {v.terminals} terminals" for v in dups[:EXAMPLES]
        ]
    if gaps:
        result.examples["seq gaps"] = [f"{label(v.job_id)}: {v.gap}" for v in gaps[:EXAMPLES]]
    if mixed:
        result.examples["interleaved"] = [
            f"{label(v.job_id)}: {v.interleaved}" for v in mixed[:EXAMPLES]
        ]
    if torn:
        result.examples["text mismatch"] = [
            f"{label(v.job_id)}: {v.text_mismatch}" for v in torn[:EXAMPLES]
        ]
    by_label: dict[str, Counter[str]] = {}
    for v in judged:
        problem = "lost" if v.events == 0 else "no terminal" if not v.ended else None
        if problem is not None:
            by_label.setdefault(ledger.labels.get(v.job_id, "?"), Counter())[problem] += 1
    if by_label:
        result.details["without a terminal, by kind of job"] = {
            k: dict(c) for k, c in sorted(by_label.items())
        }
    faults = list(faults)
    if faults:
        result.recovery_s, stuck = recovery(faults, judged)
        if stuck:
            result.notes.append(f"{stuck} job(s) in flight at a fault never moved again")
    if ledger.expired:
        result.notes.append(
            f"{ledger.expired} log(s) had expired by the end: judged as read while they lived"
        )
    if ledger.wait_errors:
        result.notes.append(f"{ledger.wait_errors} poll(s) met a Redis error during faults")
    result.exits = [e.as_dict() for e in rig.workers.exits]
    result.worker_exits = len(rig.workers.exits)
    if rig.workers.replaced:
        ready = ", ".join(f"{name} {s:.1f}s" for name, s in rig.workers.replaced)
        result.notes.append(f"replacement workers ready after: {ready}")
    result.log_excerpt = notable_lines(text for _, text in rig.worker_logs())
    result.log_dir = str(rig.dir)
    return verdicts


_NOTABLE = re.compile(
    r" (WARNING|ERROR|CRITICAL) |^\S*(Error|Exception|Exit|Interrupt)\b|Unrecoverable|Traceback"
)
_VOLATILE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ |[0-9a-f]{8}-[0-9a-f-]{27}|\b[0-9a-f]{12,}\b|\d+"
)


def notable_lines(texts: Iterable[str]) -> list[str]:
    """Warning and error lines and exception lines of worker logs, one per kind (ids and
    numbers ignored), with how many times each came: ``[count×] first example``."""
    seen: dict[str, tuple[int, str]] = {}
    for text in texts:
        for line in text.splitlines():
            if not _NOTABLE.search(line):
                continue
            key = _VOLATILE.sub("#", line)[:200]
            count, example = seen.get(key, (0, line))
            seen[key] = (count + 1, example)
    ranked = sorted(seen.values(), key=lambda item: -item[0])[:LOG_LINES]
    return [f"[{count}×] {example[:400]}" for count, example in ranked]
