"""``python -m bench``: run the benchmarks, write a JSON file and docs/benchmarks.md.

Examples::

    python -m bench --quick                       # every section, small, under a minute
    python -m bench                               # the full run behind docs/benchmarks.md
    python -m bench --only capacity --pools gevent --streams 500 --flush-ms 0,25

Needs Redis on 127.0.0.1:6379 (database 14, override with BENCH_REDIS_URL); starts and
stops its own mockllm, ticker, subscriber and worker processes; keys live under a
``bench-…`` prefix and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import capacity, failover, inprocess, queue_peers, report, service
from bench.common import ROOT, machine_info, procfile_worker

SECTIONS = (
    "inprocess",
    "queue",
    "latency",
    "throughput",
    "events",
    "failover",
    "capacity",
    "fast_tokens",
    "profiles",
)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _strs(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true", help="small counts; under a minute")
    p.add_argument("--only", type=_strs, default=None, help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument(
        "--streams",
        type=_ints,
        help="capacity levels (default 250,500,750; threads: the first two)",
    )
    p.add_argument("--flush-ms", type=_ints, help="coalescing windows (default 0,10,25,50)")
    p.add_argument(
        "--pools", type=_strs, help="worker pools (default: the Procfile's, then threads)"
    )
    p.add_argument("--stream-s", type=float, help="slow stream length (default 20)")
    p.add_argument("--json", type=Path, help="results file (default bench/results/<mode>.json)")
    p.add_argument("--md", type=Path, help="markdown to update (full run: docs/benchmarks.md)")
    p.add_argument("--no-md", action="store_true", help="write no markdown")
    p.add_argument("--log-dir", type=Path, help="process logs and raw samples (default: a tmp dir)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quick = args.quick
    only = set(args.only or SECTIONS)
    if quick and args.only is None:
        only -= {"profiles", "fast_tokens"}
    unknown = only - set(SECTIONS)
    if unknown:
        print(f"unknown section(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    procfile_pool = procfile_worker()
    streams = args.streams or ((50,) if quick else (250, 500, 750))
    windows = args.flush_ms if args.flush_ms is not None else ((0,) if quick else (0, 10, 25, 50))
    pools = args.pools or (
        (procfile_pool[0],) if quick else tuple(dict.fromkeys((procfile_pool[0], "threads")))
    )
    stream_s = args.stream_s or (3.0 if quick else 20.0)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="reliever-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.json or ROOT / "bench" / "results" / ("quick.json" if quick else "full.json")
    md_path = None if args.no_md else (args.md or (None if quick else ROOT / "docs/benchmarks.md"))

    command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    data: dict[str, Any] = {
        "command": command.strip(),
        "quick": quick,
        "machine": machine_info(),
        "log_dir": str(log_dir),
        "errors": [],
    }
    started = time.monotonic()
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())

    def step(name: str, fn: Callable[[], Any]) -> Any:
        print(f"[bench] {name} …", flush=True)
        t0 = time.monotonic()
        try:
            out = fn()
        except Exception as exc:
            traceback.print_exc()
            data["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
            return None
        print(f"[bench] {name} done in {time.monotonic() - t0:.1f}s", flush=True)
        return out

    if "inprocess" in only:
        flushed = tuple(w for w in windows if w > 0)[:1] or (() if quick else (25,))
        data["inprocess"] = step(
            "inprocess",
            lambda: inprocess.run(
                rounds=8 if quick else 300,
                warmup=2 if quick else 10,
                windows_ms=flushed,
                log_dir=log_dir,
                cap_s=10 if quick else 240,
            ),
        )
    if "queue" in only:
        data["queue"] = []
        settings = [procfile_pool] if quick else [procfile_pool, ("threads", 100)]
        for pool, conc in dict.fromkeys(settings):
            got = step(
                f"queue: reliever against a plain Celery task, {pool}/{conc}",
                lambda pool=pool, conc=conc: queue_peers.run(
                    jobs=10 if quick else 200,
                    warmup=2 if quick else 5,
                    pool=pool,
                    concurrency=conc,
                    log_dir=log_dir,
                    cap_s=15 if quick else 180,
                ),
            )
            if got:
                got["scenario"]["procfile"] = (pool, conc) == procfile_pool
                data["queue"].append(got)
    if "latency" in only:
        data["latency"] = []
        runs = [(procfile_pool, w) for w in windows]
        if not quick:
            runs.append((("threads", 100), 0))
        for (pool, conc), w in runs:
            got = step(
                f"latency {pool}/{conc} flush={w}",
                lambda pool=pool, conc=conc, w=w: service.latency(
                    jobs=10 if quick else 200,
                    warmup=2 if quick else 5,
                    concurrency=conc,
                    flush_ms=w,
                    log_dir=log_dir,
                    cap_s=10 if quick else 120,
                    pool=pool,
                ),
            )
            if got:
                data["latency"].append(got)
    if "throughput" in only:
        data["throughput"] = []
        levels = [(procfile_pool[0], 8)]
        if not quick:
            levels += [procfile_pool, ("threads", 8), ("threads", 100)]
        for pool, conc in levels:
            for w in (0,) if quick else (0, 25):
                got = step(
                    f"throughput {pool}/{conc} flush={w}",
                    lambda pool=pool, conc=conc, w=w: service.throughput(
                        jobs=50 if quick else 500,
                        concurrency=conc,
                        flush_ms=w,
                        log_dir=log_dir,
                        cap_s=30 if quick else 120,
                        pool=pool,
                    ),
                )
                if got:
                    data["throughput"].append(got)
    if "events" in only:
        data["events"] = []
        for w in (0,) if quick else (0, 25):
            got = step(
                f"delta events per second flush={w}",
                lambda w=w: service.event_rate(
                    jobs=6 if quick else 32,
                    concurrency=8,
                    pool=procfile_pool[0],
                    flush_ms=w,
                    log_dir=log_dir,
                    cap_s=30 if quick else 120,
                ),
            )
            if got:
                data["events"].append(got)
    if "failover" in only:
        data["failover"] = step(
            "failover",
            lambda: failover.run(
                rounds=1 if quick else 20,
                warmup=0 if quick else 2,
                log_dir=log_dir,
                cap_s=20 if quick else 120,
            ),
        )
    if "capacity" in only:
        data["capacity"] = []
        for pool in pools:
            for w in tuple(w for w in windows if w in (0, 25)) or windows[:1]:
                # The threads pool is past its limit at 750 (see docs/benchmarks.md).
                for n in streams if pool != "threads" or args.streams else streams[:2]:
                    got = step(
                        f"capacity pool={pool} flush={w} streams={n}",
                        lambda pool=pool, w=w, n=n: capacity.run_one(
                            streams=n,
                            pool=pool,
                            flush_ms=w,
                            stream_s=stream_s,
                            interval_ms=100,
                            ramp_s=1.5 if quick else 3.0,
                            log_dir=log_dir,
                            quiet_wait_s=0 if quick else 20,
                        ),
                    )
                    if got:
                        data["capacity"].append(got)
                    if pool != "gevent" or w != 0:
                        continue
                    # The same load on the bare stack, next to it: what this machine
                    # allows any Python worker on httpx + httpx-sse.
                    spread = (got or {}).get("submit_s", 0.7)
                    floor = step(
                        f"capacity floor streams={n}",
                        lambda n=n, spread=spread: capacity.run_floor(
                            streams=n,
                            stream_s=stream_s,
                            interval_ms=100,
                            ramp_s=1.5 if quick else 3.0,
                            log_dir=log_dir,
                            spread_s=spread,
                            quiet_wait_s=0 if quick else 20,
                        ),
                    )
                    if floor:
                        data["capacity"].append(floor)
    if "fast_tokens" in only:
        data["fast_tokens"] = []
        for w in windows:
            got = step(
                f"fast tokens flush={w}",
                lambda w=w: capacity.run_one(
                    streams=50 if quick else 100,
                    pool=procfile_pool[0],
                    flush_ms=w,
                    stream_s=5.0 if quick else 10.0,
                    interval_ms=20,
                    ramp_s=2.0,
                    log_dir=log_dir,
                    quiet_wait_s=0 if quick else 20,
                ),
            )
            if got:
                data["fast_tokens"].append(got)
    if "profiles" in only:
        from bench import profile

        data["profiles"] = []
        for pool in pools:
            got = step(
                f"profile pool={pool}",
                lambda pool=pool: profile.run(
                    streams=500,
                    pool=pool,
                    flush_ms=0,
                    stream_s=20.0,
                    interval_ms=100,
                    log_dir=log_dir,
                ),
            )
            if got:
                data["profiles"].append(got)

    data["elapsed_s"] = time.monotonic() - started
    end = machine_info()
    data["machine"]["commit_end"] = end["commit"]
    data["machine"]["worker_tree_dirty_end"] = end["worker_tree_dirty"]
    data["load"] = {
        "before": load_before,
        "after": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    print(f"[bench] results: {json_path}; logs: {log_dir}; {data['elapsed_s']:.0f}s", flush=True)
    if md_path is not None:
        report.write(md_path, data)
        print(f"[bench] wrote {md_path}", flush=True)
    if data["errors"]:
        print("[bench] errors:\n  " + "\n  ".join(data["errors"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
