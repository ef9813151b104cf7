"""The run's report: one markdown table of every scenario, then each scenario's evidence."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from chaos.result import Result

COLUMNS = (
    "scenario", "jobs", "lost", "dup terminals", "no terminal", "seq gaps", "interleaved",
    "text mismatch", "worker exits", "reruns", "recovery s", "time s", "result",
)  # fmt: skip


def _row(r: Result) -> list[str]:
    recovery = "-" if r.recovery_s is None else f"{r.recovery_s:.1f}"
    verdict = "**pass**" if r.passed else "**FAIL**"
    if r.error is not None:
        verdict = "**ERROR**"
    return [
        r.scenario, str(r.jobs), str(r.lost), str(r.duplicate_terminals), str(r.no_terminal),
        str(r.seq_gaps), str(r.interleaved), str(r.text_mismatch), str(r.worker_exits),
        str(r.restarted), recovery,
        f"{r.elapsed_s:.0f}", verdict,
    ]  # fmt: skip


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def table(results: Iterable[Result]) -> str:
    """The summary: one row per scenario."""
    return _table(COLUMNS, (_row(r) for r in results))


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def evidence(result: Result) -> str:
    """What a scenario found: failures, checks, outcomes, examples, exits, log lines."""
    out = [f"### {result.scenario}: {'pass' if result.passed else 'FAIL'}", ""]
    for reason in result.failures():
        out.append(f"- fails: {reason}")
    for check in result.checks:
        out.append(f"- check {'ok' if check.ok else 'FAILED'}: {check.name} ({check.detail})")
    if result.outcomes:
        out.append(f"- outcomes: {_value(result.outcomes)}")
    out += [f"- note: {note}" for note in result.notes]
    for what, examples in result.examples.items():
        out.append(f"- {what}, for example:")
        out += [f"  - `{e}`" for e in examples]
    for key, value in result.details.items():
        if key == "catalogue":
            continue
        if key == "samples":
            out.append("- samples: " + "; ".join(_sample(s) for s in value))
            continue
        out.append(f"- {key}: {_value(value)}")
    if "catalogue" in result.details:
        out += ["", _catalogue(result.details["catalogue"])]
    for exit_ in result.exits:
        out.append(f"- worker {exit_['name']} exited with {exit_['returncode']}; its last lines:")
        out += ["", "  ```", *(f"  {line[:300]}" for line in exit_["tail"][-10:]), "  ```"]
    if result.log_excerpt:
        out += ["- notable worker log lines:", "", "  ```"]
        out += [f"  {line}" for line in result.log_excerpt]
        out.append("  ```")
    if result.log_dir:
        out.append(f"- logs: `{result.log_dir}`")
    return "\n".join(out)


def _sample(sample: Mapping[str, Any]) -> str:
    return (
        f"+{sample['at_s']}s rss {sample['rss_mb']} MB, redis {sample['used_memory_mb']} MB, "
        f"{sample['keys']} keys"
    )


def _catalogue(rows: Sequence[Mapping[str, Any]]) -> str:
    header = ("entry", "carries id", "worker exits", "valid job after it", "its own terminal", "s")
    return _table(
        header,
        (
            (
                f"`{row['item']}`: {row['what']}",
                "yes" if row["carries id"] else "no",
                ", ".join(row["worker exits"]) or "0",
                row["valid job"],
                row["malformed"],
                str(row["seconds"]),
            )
            for row in rows
        ),
    )


def markdown(results: Sequence[Result], run: Mapping[str, Any]) -> str:
    """The whole report: the run's facts, the table, each scenario's evidence."""
    head = [
        f"Command: `{run['command']}` at commit `{run['commit']}`"
        f"{' (worker/ or tasks/ modified)' if run.get('dirty') else ''}, {run['when']}; "
        f"{run['cores']} cores, load before {run['load_before']}, after {run['load_after']}.",
        "",
        table(results),
        "",
    ]
    return "\n".join(head + [evidence(r) + "\n" for r in results])
