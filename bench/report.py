"""Markdown tables from a results JSON; written between markers in docs/benchmarks.md.

Only the part between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` is generated;
the prose around it (findings, recommendations) is kept as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"


def _ms(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:
        return "–"
    return f"{value * 1000:.{digits}f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def machine(info: dict[str, Any], command: str) -> list[str]:
    pk = info["packages"]
    dirty = (
        " (work tree had uncommitted changes in worker/: "
        + ", ".join(line.strip() for line in info.get("dirty_files", []))
        + ")"
        if info.get("worker_tree_dirty")
        else ""
    )
    return [
        f"- Command: `{command}`",
        f"- Commit: `{info['commit']}`{dirty}; run at {info['when']}",
        f"- Machine: {info['cores']} cores ({info['cpu']}), {info['memory_gb']} GB, {info['os']}",
        f"- Python {info['python']}; Redis server {info['redis_server']}",
        "- Packages: " + ", ".join(f"{name} {version}" for name, version in pk.items()),
    ]


def inprocess(res: dict[str, Any]) -> list[str]:
    sc = res["scenario"]
    lines = [
        f"Fixed response: {sc['chunks']} chunks of {sc['chunk_chars']} characters, no server "
        f"delay; {sc['rounds']} rounds per variant after {sc['warmup_rounds']} warm-up rounds, "
        "interleaved; upstream: " + sc["upstream"] + ".",
        "",
    ]
    rows = []
    for row in res["rows"]:
        f, t, o = row["first"], row["total"], row["overhead"]
        rows.append(
            [
                row["variant"],
                _ms(f["p50"]),
                _ms(f["p99"]),
                _ms(t["p50"]),
                _ms(t["p99"]),
                f"{row['cpu_us_per_chunk']:.1f}",
                f"{o['first_p50_ms']:+.2f} / {o['first_p99_ms']:+.2f}",
                f"{o['total_p50_ms']:+.2f} / {o['total_p99_ms']:+.2f}",
                f"{o['cpu_us_per_chunk']:+.1f} (×{o['cpu_ratio']:.2f})",
            ]
        )
    lines += _table(
        [
            "variant",
            "first delta p50 ms",
            "p99 ms",
            "total p50 ms",
            "p99 ms",
            "CPU µs/chunk",
            "Δ first p50/p99 ms",
            "Δ total p50/p99 ms",
            "Δ CPU µs/chunk (ratio)",
        ],
        rows,
    )
    return lines


def latency(results: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for res in results:
        sc = res["scenario"]
        st = res["stats"]
        lines += [
            f"**{sc['pool']} pool, concurrency {sc['concurrency']}, RELIEVER_DELTA_FLUSH_MS="
            f"{sc['delta_flush_ms']}**: {sc['jobs']} sequential jobs after {sc['warmup_jobs']} "
            f"warm-up, {sc['chunks']} chunks each; reader: {sc['reader']}; failed: "
            f"{res['failed']}.",
            "",
        ]
        names = [
            ("enqueue → first delta received", "first"),
            ("direct: request → first chunk", "direct_first"),
            ("**overhead, first delta (paired)**", "d_first"),
            ("enqueue → terminal event received", "terminal"),
            ("direct: request → end of stream", "direct_total"),
            ("**overhead, terminal (paired)**", "d_term"),
        ]
        rows = [
            [
                label,
                _ms(st[key]["p50"]),
                _ms(st[key]["p95"]),
                _ms(st[key]["p99"]),
                _ms(st[key]["max"]),
            ]
            for label, key in names
        ]
        for stage, s in res.get("stages", {}).items():
            rows.append(
                [f"stage: {stage}", _ms(s["p50"]), _ms(s["p95"]), _ms(s["p99"]), _ms(s["max"])]
            )
        lines += _table(["measure", "p50 ms", "p95 ms", "p99 ms", "max ms"], rows)
        lines.append("")
    return lines


def throughput(results: list[dict[str, Any]]) -> list[str]:
    rows = []
    for res in results:
        sc = res["scenario"]
        rows.append(
            [
                f"{sc['pool']} / {sc['concurrency']}",
                str(sc["delta_flush_ms"]),
                f"{res['done']}/{sc['jobs']} ({res['completed']} completed)",
                f"{res['elapsed_s']:.2f}",
                f"**{res['jobs_per_s']:.0f}**",
                f"{res['worker_cpu_pct']:.0f}",
                f"{res['worker_cpu_ms_per_job']:.2f}",
                f"{res['worker_peak_rss_mb']:.0f}",
            ]
        )
    return _table(
        [
            "pool / concurrency",
            "flush ms",
            "jobs done",
            "wall s",
            "jobs/s",
            "worker CPU %",
            "worker CPU ms/job",
            "worker RSS MB",
        ],
        rows,
    )


def capacity(results: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in results:
        if "e2e_all" not in r:
            rows.append(
                [r["pool"], str(r["flush_ms"]), str(r["streams"]), "run failed"] + [""] * 10
            )
            continue
        cpu = r["cpu_steady_pct"]
        rows.append(
            [
                r["pool"],
                str(r["flush_ms"]),
                f"{r['streams']} × {r['stream_s']:g}s @{r['interval_ms']}ms",
                f"{r['completed']}/{r['streams']}"
                + (f" ({r['failed']} failed)" if r["failed"] else ""),
                _ms(r["e2e_steady"].get("p50"), 1),
                _ms(r["e2e_steady"].get("p99"), 1),
                _ms(r["e2e_all"].get("p99"), 1),
                _ms(r["e2e_all"].get("max"), 0),
                f"{r['delta_events'] / max(r['tokens'], 1):.2f}",
                f"{r['worker_peak_rss_mb']:.0f}",
                f"{cpu.get('worker', 0):.0f}",
                " / ".join(f"{cpu.get(k, 0):.0f}" for k in ("redis", "ticker", "subscriber")),
                f"{r['other_cpu_pct']:.0f}",
                "**yes**" if r["holds"] else "no",
            ]
        )
    return _table(
        [
            "pool",
            "flush ms",
            "streams",
            "completed",
            "steady p50 ms",
            "steady p99 ms",
            "all p99 ms",
            "max ms",
            "events/token",
            "worker peak RSS MB",
            "worker CPU %",
            "Redis / upstream / subscriber CPU %",
            "other load CPU %",
            "holds (p99 < 100 ms, RSS < 500 MB)",
        ],
        rows,
    )


def profiles(results: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for res in results:
        prof = res.get("profile")
        lines.append(
            f"**{res['pool']} pool, {res['streams']} streams @{res['interval_ms']} ms, "
            f"flush {res['flush_ms']} ms** ({prof['samples'] if prof else 0} samples, "
            "py-spy --gil --nonblocking)" + (f"; error: {res['error']}" if res.get("error") else "")
        )
        lines.append("")
        if not prof:
            continue
        lines += _table(
            ["self %", "function (file:function)"],
            [[f"{share:.1f}", f"`{name}`"] for name, share in prof["self"][:15]],
        )
        lines.append("")
        lines += _table(
            ["inclusive %", "function (file:function)"],
            [[f"{share:.1f}", f"`{name}`"] for name, share in prof["inclusive"][:30]],
        )
        lines.append("")
    return lines


def render(data: dict[str, Any]) -> str:
    lines = [BEGIN, "", "## Run", ""]
    lines += machine(data["machine"], data["command"])
    lines.append(f"- Wall time of the run: {data['elapsed_s']:.0f} s")
    lines.append("")
    sections = [
        (
            "inprocess",
            "## 1. In-process: executor overhead over a bare httpx + httpx-sse stream",
            inprocess,
        ),
        (
            "latency",
            "## 2. Through the queue: enqueue → first delta, minus the direct first chunk",
            latency,
        ),
        ("throughput", "## 3. Short jobs per second, one worker process", throughput),
        ("capacity", "## 4–5. Capacity: concurrent slow streams per worker process", capacity),
        ("fast_tokens", "## 4b. Fast token streams: what coalescing buys", capacity),
        ("profiles", "## Profiles (py-spy, worker under load)", profiles),
    ]
    for key, title, fn in sections:
        if data.get(key):
            lines += [title, ""]
            lines += fn(data[key])
            lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write(md_path: Path, data: dict[str, Any]) -> None:
    generated = render(data)
    if md_path.exists():
        text = md_path.read_text(encoding="utf-8")
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            md_path.write_text(head + generated.rstrip("\n") + tail, encoding="utf-8")
            return
        md_path.write_text(text.rstrip("\n") + "\n\n" + generated, encoding="utf-8")
        return
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("# Benchmarks\n\n" + generated, encoding="utf-8")
