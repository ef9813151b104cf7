"""Where a worker's CPU goes under load: py-spy on a capacity run, summarised by function.

``python -m bench --only profiles`` (500 streams, flush 0, each pool of ``--pools``)

py-spy (``pip install py-spy``, in the ``bench`` extra) samples the worker for a few seconds
of the steady part of a capacity run with ``--gil`` (only the thread holding the GIL, i.e.
where Python CPU goes) and ``--nonblocking`` (the worker is not paused). The collapsed
stacks are summarised into self and inclusive shares per ``file:function``. A profiled run
is never one of the measured runs: sampling costs the worker CPU.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import capacity


def _frame_key(frame: str) -> str:
    name, _, loc = frame.strip().partition(" (")
    path = loc.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker.startswith("/lib"):
                path = "stdlib/" + path.split("/", 1)[-1]
            break
    root = str(Path(__file__).resolve().parent.parent) + "/"
    return f"{path.replace(root, '')}:{name}"


def summarize(raw: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive shares per ``file:function`` from py-spy's ``--format raw``."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame_key(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        own[frames[-1]] += n
        for key in set(frames):
            incl[key] += n
    return {
        "samples": total,
        "self": [(k, 100.0 * n / total) for k, n in own.most_common(top)] if total else [],
        "inclusive": [(k, 100.0 * n / total) for k, n in incl.most_common(top * 2)]
        if total
        else [],
    }


def _find_worker(pool: str, streams: int, timeout_s: float) -> int | None:
    pattern = f"celery -A worker worker --pool {pool} --concurrency {streams} "
    ends = time.monotonic() + timeout_s
    while time.monotonic() < ends:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if pattern in cmd and "bench-" in (proc / "environ").read_bytes().decode(
                errors="replace"
            ):
                return int(proc.name)
        time.sleep(0.2)
    return None


def run(
    *,
    streams: int,
    pool: str,
    flush_ms: int,
    stream_s: float,
    interval_ms: int,
    log_dir: Path,
    sample_s: float = 8.0,
) -> dict[str, Any]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    raw = log_dir / f"pyspy-{pool}-{streams}-f{flush_ms}.txt"
    outcome: dict[str, Any] = {}

    def attach() -> None:
        pid = _find_worker(pool, streams, 60)
        if pid is None:
            outcome["error"] = "worker not found"
            return
        # Let the worker get past start-up and the ramp before sampling.
        time.sleep(min(8.0, stream_s / 2))
        proc = subprocess.run(
            [
                spy, "record", "--pid", str(pid), "--duration", str(int(sample_s)),
                "--rate", "100", "--gil", "--nonblocking", "--format", "raw", "-o", str(raw),
            ],
            capture_output=True, text=True, timeout=sample_s + 60, check=False,
        )  # fmt: skip
        outcome["pyspy_rc"] = proc.returncode
        if proc.returncode != 0:
            outcome["error"] = proc.stderr[-2000:]

    thread = threading.Thread(target=attach, daemon=True)
    thread.start()
    measured = capacity.run_one(
        streams=streams,
        pool=pool,
        flush_ms=flush_ms,
        stream_s=stream_s,
        interval_ms=interval_ms,
        ramp_s=3.0,
        log_dir=log_dir,
    )
    thread.join(timeout=120)
    result: dict[str, Any] = {
        "streams": streams,
        "pool": pool,
        "flush_ms": flush_ms,
        "interval_ms": interval_ms,
        "run": measured,
        **outcome,
    }
    if raw.exists():
        result["profile"] = summarize(raw)
    return result
