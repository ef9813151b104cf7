"""Markdown tables from a results JSON; written between markers in docs/benchmarks.md.

Only the part between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` is generated;
the prose around it (findings, recommendations) is kept as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.capacity import FLOOR_POOL

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
        f"- Commit: `{info['commit']}`{dirty}; run at {info['when']}"
        + (
            f"; **HEAD moved to `{info['commit_end']}` during the run**"
            if info.get("commit_end") and info["commit_end"] != info["commit"]
            else ""
        ),
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
    peers = res.get("peers", {})
    lit = peers.get("litellm")
    if isinstance(lit, dict):
        lines += [
            "",
            f"LiteLLM {lit['version']} `Router`: groups {lit['fallbacks']}, num_retries="
            f"{lit['num_retries']}, allowed_fails={lit['allowed_fails']}, cooldown_time="
            f"{lit['cooldown_time_s']} s, state {lit['state']}, callbacks {lit['callbacks']}, "
            "LITELLM_LOCAL_MODEL_COST_MAP=True; outbound connection attempts: "
            f"{len(lit.get('outbound_attempts', []))}. reliever's agent: "
            f"{res['scenario'].get('reliever_agent', '')}.",
        ]
    elif lit:
        lines += ["", f"LiteLLM: {lit}"]
    if res.get("vs_litellm"):
        lines += [
            "",
            "**reliever's overhead over the floor as a fraction of LiteLLM Router's** "
            "(target ≤ 0.33 for time to first delta and CPU per chunk):",
            "",
        ]
        vs_rows = []
        for row in res["vs_litellm"]:
            vs_rows.append(
                [
                    row["variant"],
                    _frac(row["first_p50_ms"]),
                    _frac(row["first_p99_ms"]),
                    _frac(row["total_p50_ms"]),
                    _frac(row["total_p99_ms"]),
                    _frac(row["cpu_us_per_chunk"]),
                ]
            )
        lines += _table(
            [
                "variant",
                "Δ first p50 ÷ LiteLLM's",
                "Δ first p99 ÷",
                "Δ total p50 ÷",
                "Δ total p99 ÷",
                "Δ CPU/chunk ÷",
            ],
            vs_rows,
        )
    return lines


def _frac(value: float | None) -> str:
    if value is None or value != value:
        return "–"
    mark = " ✓" if value <= 1 / 3 else " ✗"
    return f"{value:.2f}{mark}"


def queue(results: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for res in results:
        lines += _queue_one(res)
        lines.append("")
    return lines


def _queue_one(res: dict[str, Any]) -> list[str]:
    sc = res["scenario"]
    st = res["stats"]
    lines = [
        f"**{sc['pool']} pool, concurrency {sc['concurrency']}"
        + (" (the Procfile's worker settings)**" if sc.get("procfile") else "**")
        + f". Both workers: {sc['pool']} pool, concurrency {sc['concurrency']}, prefetch "
        f"{sc['prefetch']}, acks_late, -E; {sc['jobs']} rounds after {sc['warmup_jobs']} "
        f"warm-up, one job at a time, {sc['chunks']} chunks per job; RELIEVER_DELTA_FLUSH_MS "
        f"{sc['delta_flush_ms']}. reliever: {sc['reliever']}. Plain: {sc['plain']}. "
        f"Subscriber: {sc['subscriber']}. Failed: reliever {res['failed']['reliever']}, "
        f"plain {res['failed']['plain']}.",
        "",
    ]
    names = [
        ("enqueue → first delta received", "first"),
        ("**overhead, first delta (paired, − direct first chunk)**", "d_first"),
        ("enqueue → terminal received", "terminal"),
        ("**overhead, terminal (paired, − direct end of stream)**", "d_term"),
    ]
    rows = [
        [
            "direct (bare httpx): first chunk",
            _ms(st["direct_first"]["p50"]),
            "",
            _ms(st["direct_first"]["p99"]),
            "",
            "",
        ],
        [
            "direct (bare httpx): end of stream",
            _ms(st["direct_total"]["p50"]),
            "",
            _ms(st["direct_total"]["p99"]),
            "",
            "",
        ],
    ]
    ratios = res.get("ratio_reliever_to_plain", {})
    for label, key in names:
        r, p = st[f"reliever_{key}"], st[f"plain_{key}"]
        ratio = ratios.get(key, {})
        rows.append(
            [
                label,
                _ms(r.get("p50")),
                _ms(p.get("p50")),
                _ms(r.get("p99")),
                _ms(p.get("p99")),
                f"{ratio.get('p50', float('nan')):.2f} / {ratio.get('p99', float('nan')):.2f}",
            ]
        )
    lines += _table(
        [
            "measure",
            "reliever p50 ms",
            "plain Celery p50 ms",
            "reliever p99 ms",
            "plain Celery p99 ms",
            "reliever ÷ plain p50 / p99",
        ],
        rows,
    )
    for peer, per in res.get("stages", {}).items():
        if not per:
            continue
        lines += ["", f"Stages of the first delta, {peer} (from the messages' `ts`):", ""]
        lines += _table(
            ["stage", "p50 ms", "p99 ms"],
            [[name, _ms(s.get("p50")), _ms(s.get("p99"))] for name, s in per.items()],
        )
    return lines


def events(results: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in results:
        sc = r["scenario"]
        rows.append(
            [
                str(sc["delta_flush_ms"]),
                f"{r['completed']}/{sc['jobs']} × {sc['chunks']} chunks, {sc['pool']} / "
                f"{sc['concurrency']}",
                f"{r['elapsed_s']:.2f}",
                f"**{r['delta_events_per_s']:.0f}**",
                f"{r['tokens_per_s']:.0f}",
                f"{r['events_per_token']:.2f}",
                f"{r['worker_cpu_pct']:.0f}",
                f"{r['worker_cpu_us_per_token']:.1f}",
                f"{r['mockllm_cpu_pct']:.0f}",
            ]
        )
    return _table(
        [
            "flush ms",
            "jobs",
            "wall s",
            "delta events/s",
            "tokens/s",
            "events/token",
            "worker CPU %",
            "worker CPU µs/token",
            "mockllm CPU %",
        ],
        rows,
    )


def failover(res: dict[str, Any]) -> list[str]:
    sc = res["scenario"]
    lines = [
        f"Primary {sc['primary']}; fallback {sc['fallback']}; policy: {sc['policy']}. "
        f"Backoff: reliever {sc['reliever_backoff']}; LiteLLM {sc['litellm_backoff']}. "
        f"{sc['rounds']} rounds after {sc['warmup_rounds']} warm-up. reliever's sink: "
        f"{sc['reliever_sink']}. Floor (bare httpx stream of the fallback) total p50 "
        f"{_ms(res['floor_total'].get('p50'))} ms"
        + (
            f"; three bare POSTs to the failing primary (each after reliever's pause) p50 "
            f"{_ms(res['floor_three_503'].get('p50'))} ms"
            if res.get("floor_three_503")
            else ""
        )
        + (f". Measured at commit `{res['commit']}`." if res.get("commit") else "."),
        "",
    ]
    rows = []
    for r in res["rows"]:
        rows.append(
            [
                r["variant"],
                _ms(r["total"].get("p50")),
                _ms(r["waits"].get("p50")),
                _ms(r["added"].get("p50")),
                _ms(r["added"].get("p99")),
                _ms(r.get("added_net", {}).get("p50")),
                _ms(r.get("added_net", {}).get("p99")),
                f"{r['primary_requests'].get('mean', 0):.1f}",
                f"{r['fallback_requests'].get('mean', 0):.1f}",
            ]
        )
    lines += _table(
        [
            "job",
            "total p50 ms",
            "planned waits p50 ms",
            "added p50 ms",
            "added p99 ms",
            "**added net of the 503s, p50 ms**",
            "net p99 ms",
            "requests to primary / job",
            "to fallback / job",
        ],
        rows,
    )
    for r in res["rows"]:
        stages = {k: v for k, v in r.items() if k.startswith("stage: ")}
        if not stages:
            continue
        lines += ["", f"Where the time goes, {r['variant']} (from its events' `ts`):", ""]
        lines += _table(
            ["stage", "p50 ms", "p99 ms"],
            [[k[7:], _ms(v.get("p50")), _ms(v.get("p99"))] for k, v in stages.items()],
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
                [r["pool"], str(r["flush_ms"]), str(r["streams"]), "run failed"] + [""] * 11
            )
            continue
        cpu = r["cpu_steady_pct"]
        floor = r["pool"] == FLOOR_POOL
        rows.append(
            [
                r["pool"],
                "—" if floor else str(r["flush_ms"]),
                f"{r['streams']} × {r['stream_s']:g}s @{r['interval_ms']}ms",
                f"{r['completed']}/{r['streams']}"
                + (f" ({r['failed']} failed)" if r["failed"] else ""),
                _ms(r["e2e_steady"].get("p50"), 1),
                _ms(r["e2e_steady"].get("p99"), 1),
                _ms(r["e2e_all"].get("p99"), 1),
                _ms(r["e2e_all"].get("max"), 0),
                "—" if floor else f"{r['delta_events'] / max(r['tokens'], 1):.2f}",
                f"{r['worker_peak_rss_mb']:.0f}",
                f"{cpu.get('worker', 0):.0f}",
                f"{r['cpu_us_per_token']:.0f}" if "cpu_us_per_token" in r else "",
                " / ".join(
                    f"{cpu[k]:.0f}" if k in cpu else "—" for k in ("redis", "ticker", "subscriber")
                ),
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
            "worker CPU µs per token",
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


def _target_rows(data: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []

    def verdict(ok: bool | None) -> str:
        return "–" if ok is None else ("met" if ok else "**missed**")

    ip = data.get("inprocess") or {}
    for row in ip.get("vs_litellm", []):
        if row["variant"] not in (
            "reliever executor + no-op sink",
            "reliever executor + Redis sink (flush 0)",
        ):
            continue
        for key, what in (("first_p50_ms", "first delta p50"), ("cpu_us_per_chunk", "CPU/chunk")):
            value = row[key]
            ok = None if value != value else value <= 1 / 3
            rows.append(
                [
                    f"in-process overhead ≤ ⅓ of LiteLLM's: {what}, {row['variant']}",
                    f"{value:.2f}",
                    verdict(ok),
                ]
            )
    for q in data.get("queue") or []:
        st = q["stats"]
        where = f"{q['scenario']['pool']}/{q['scenario']['concurrency']}"
        for key, what in (("first", "first delta"), ("terminal", "terminal")):
            for pct in ("p50", "p99"):
                r, p = st[f"reliever_{key}"].get(pct), st[f"plain_{key}"].get(pct)
                ok = None if r is None or p is None else r <= p
                rows.append(
                    [
                        f"queue ({where}): reliever no slower than plain Celery, {what} {pct}",
                        f"{_ms(r)} vs {_ms(p)} ms",
                        verdict(ok),
                    ]
                )
        for pct, limit in (("p50", 0.005), ("p99", 0.020)):
            v = st["reliever_d_first"].get(pct)
            rows.append(
                [
                    f"queue ({where}) overhead over the floor, first delta {pct} ≤ "
                    f"{limit * 1000:.0f} ms",
                    f"{_ms(v)} ms",
                    verdict(None if v is None else v <= limit),
                ]
            )
    caps = [c for c in data.get("capacity") or [] if "e2e_all" in c and c["pool"] != FLOOR_POOL]
    if caps:
        best = max(caps, key=lambda c: (c["holds"], c["streams"]))
        held = [c for c in caps if c["holds"]]
        top = max((c["streams"] for c in held), default=0)
        rows.append(
            [
                "≥ 500 streams per worker process, RSS < 500 MB, delta p99 < 100 ms",
                f"holds up to {top} (best: {best['pool']} flush {best['flush_ms']}, "
                f"{best['streams']} streams)",
                verdict(top >= 500),
            ]
        )
    fo = data.get("failover") or {}
    for r in fo.get("rows", []):
        if not r["variant"].startswith("reliever"):
            continue
        added = r["added"].get("p50")
        if "first" in r["variant"]:
            net = r.get("added_net", {}).get("p50")
            ok = None if net is None else net <= 0.005
            rows.append(
                [
                    "failover adds ≤ 5 ms beyond the planned waits (first job, p50; net of "
                    "the upstream's own 503 round trips)",
                    f"{_ms(net)} ms net ({_ms(added)} ms with the 503 round trips)",
                    verdict(ok),
                ]
            )
        else:
            primary = r["primary_requests"].get("max", 0)
            ok = None if added is None else (added <= 0.002 and primary == 0)
            rows.append(
                [
                    "inside the cooldown ≈ 0 added (≤ 2 ms p50), no request to the primary",
                    f"{_ms(added)} ms, {primary:.0f} requests to the primary",
                    verdict(ok),
                ]
            )
    return rows


def targets(rows: list[list[str]]) -> list[str]:
    return _table(["target", "measured", "verdict"], rows)


def render(data: dict[str, Any]) -> str:
    data = {**data, "targets": _target_rows(data)}
    lines = [BEGIN, "", "## Run", ""]
    lines += machine(data["machine"], data["command"])
    lines.append(f"- Wall time of the run: {data['elapsed_s']:.0f} s")
    if data.get("load"):
        ld = data["load"]
        lines.append(
            f"- Other load on the machine: load average {ld['before']} before, {ld['after']} "
            "after the run (both cores are shared with other sessions)"
        )
    lines.append("")
    sections = [
        ("targets", "## Targets (issue 5), from this run", targets),
        (
            "inprocess",
            "## 1. In-process, per call: reliever, LiteLLM Router and the floor, side by side",
            inprocess,
        ),
        (
            "queue",
            "## 2. Through the queue: reliever against a plain Celery task, side by side",
            queue,
        ),
        (
            "latency",
            "## 2b. Through the queue: reliever, replay-log reader, per flush window",
            latency,
        ),
        ("throughput", "## 3. Short jobs per second, one worker process", throughput),
        ("events", "## 3b. Delta events per second, one worker process", events),
        ("failover", "## 4. Failover: primary always 503, fallback healthy", failover),
        ("capacity", "## 5. Capacity: concurrent slow streams per worker process", capacity),
        ("fast_tokens", "## 5b. Fast token streams: what coalescing buys", capacity),
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
