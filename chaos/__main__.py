"""``python -m chaos``: run the chaos scenarios against real processes; print a report.

Examples::

    python -m chaos                                   # every scenario, full size (~25 min)
    python -m chaos --quick                           # every scenario, small (~11 min)
    python -m chaos --scenario malformed --scenario fuzz --json /tmp/chaos.json
    python -m chaos --scenario soak --soak-s 3600     # an hour of steady load

Needs ``redis-server`` on PATH: each scenario starts its own on a free port (never 6379)
and stops it. Exit status 0 when every scenario passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from chaos import report
from chaos.result import Result
from chaos.rig import ROOT
from chaos.scenarios import QUICK, SCENARIOS


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return done.stdout.strip()


def _names(values: list[str] | None) -> list[str]:
    if not values:
        return list(SCENARIOS)
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--scenario", action="append", metavar="NAME",
        help=f"run only these (repeat, or a comma list): {', '.join(SCENARIOS)}",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="every scenario smaller")
    p.add_argument("--json", type=Path, help="write the results to this JSON file")
    p.add_argument("--md", type=Path, help="write the markdown report to this file too")
    p.add_argument("--soak-s", type=float, help="the soak's duration (default 900, quick 180)")
    p.add_argument("--log-dir", type=Path, help="process logs (default: a new tmp dir)")
    return p


def run(name: str, log_dir: Path, params: dict[str, Any]) -> Result:
    """One scenario; a harness failure becomes a result with ``error`` set."""
    began = time.monotonic()
    try:
        result = SCENARIOS[name](log_dir, **params)
    except Exception as exc:
        traceback.print_exc()
        result = Result(name, error=f"{type(exc).__name__}: {exc}", log_dir=str(log_dir / name))
    result.elapsed_s = time.monotonic() - began
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = _names(args.scenario)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="reliever-chaos-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m chaos " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    facts: dict[str, Any] = {
        "command": command.strip(),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--", "worker", "tasks", "settings.py")),
        "when": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cores": os.cpu_count(),
        "load_before": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "log_dir": str(log_dir),
    }
    results = []
    for name in names:
        params = dict(QUICK[name]) if args.quick else {}
        if name == "soak" and args.soak_s is not None:
            params["duration_s"] = args.soak_s
        print(f"[chaos] {name} …", flush=True)
        result = run(name, log_dir, params)
        results.append(result)
        verdict = (
            "pass"
            if result.passed
            else "FAIL: " + "; ".join(reason[:100] for reason in result.failures())
        )
        print(f"[chaos] {name}: {verdict} ({result.elapsed_s:.0f}s)", flush=True)
    facts["load_after"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    text = report.markdown(results, facts)
    print()
    print(text)
    if args.md is not None:
        args.md.write_text(text, encoding="utf-8")
    if args.json is not None:
        data = {**facts, "results": [r.as_dict() for r in results]}
        args.json.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    print(f"[chaos] logs: {log_dir}", flush=True)
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
