"""``python -m worker.demo``: a few jobs through the demo agent, streamed live.

The demo agent's primary is scripted (examples/demo-scenarios.yaml) to fail in the ways
the chain handles: a 503 (retried after a backoff), a stream cut mid-answer (retried,
its partial text discarded), a 429 (fallback at once, and the cooldown pins the agent to
the fallback). The next job starts at the fallback; once the cooldown expires the
job starts at the primary again, which has recovered. The last job is cancelled mid-stream.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from settings import Settings
from worker.client import Client, Job
from worker.keys import Keys

DIM, BOLD, RED, GREEN, YELLOW, CYAN, RESET = (
    "\033[2m",
    "\033[1m",
    "\033[31m",
    "\033[32m",
    "\033[33m",
    "\033[36m",
    "\033[0m",
)


def describe(event: dict[str, Any]) -> str | None:
    """One line for a non-delta event (None for deltas, which print inline)."""
    kind = event["type"]
    if kind == "started":
        chain = " -> ".join(event["chain"])
        pinned = f" {YELLOW}(inside a cooldown: pinned){RESET}" if event["in_cooldown"] else ""
        start = event["start_model"]
        return (
            f"{BOLD}started{RESET} agent {event['agent']}: chain {chain}; starts at {start}{pinned}"
        )
    if kind == "attempt":
        return (
            f"{CYAN}attempt {event['attempt']}/{event['max_attempts']} on {event['model']}{RESET}"
        )
    if kind == "retry":
        error = event["error"]
        drop = f" {YELLOW}(discard the partial text){RESET}" if event["discard"] else ""
        why = f"{error['kind']}: {error['message']}"
        return f"{YELLOW}retry in {event['delay_s']:.2f}s after {why}{RESET}{drop}"
    if kind == "fallback":
        error = event["error"]
        drop = f" {YELLOW}(discard the partial text){RESET}" if event["discard"] else ""
        why = f"{error['kind']}: {error['message']}"
        return f"{YELLOW}fallback {event['from']} -> {event['to']} after {why}{RESET}{drop}"
    if kind == "restarted":
        return f"{YELLOW}restarted on another worker (discard the partial text){RESET}"
    if kind == "completed":
        usage = event["usage"]
        return (
            f"{GREEN}completed by {event['model']} in {event['duration_s']:.2f}s after "
            f"{len(event['attempts'])} attempt(s); tokens in/out {usage['input_tokens']}/"
            f"{usage['output_tokens']}{RESET}"
        )
    if kind == "failed":
        error = event["error"]
        return f"{RED}failed: {error['kind']}: {error['message']}{RESET}"
    return None


def follow(
    job: Job,
    label: str,
    out: TextIO,
    *,
    cancel_after_deltas: int | None = None,
    client: Client | None = None,
) -> dict[str, Any]:
    """Print a job's events as they arrive; return its terminal event."""
    deltas = 0
    inline = False
    for event in job.events(timeout=120):
        if event["type"] == "delta":
            if not inline:
                out.write(f"{DIM}[{label}]{RESET}   ")
                inline = True
            out.write(event.get("text") or "")
            out.flush()
            deltas += 1
            if cancel_after_deltas is not None and deltas == cancel_after_deltas and client:
                client.cancel(job.job_id)
                out.write(f" {RED}<cancel>{RESET}")
            continue
        if inline:
            out.write("\n")
            inline = False
        line = describe(event)
        if line:
            out.write(f"{DIM}[{label}]{RESET} {line}\n")
            out.flush()
        if event["type"] in ("completed", "failed"):
            return event
    raise RuntimeError("the event stream ended without a terminal event")


def wait_for_cooldown_end(client: Client, agent: str, out: TextIO, limit_s: float = 30) -> None:
    key = Keys(client.settings.key_prefix).cooldown(agent)
    ttl_ms = client.redis.pttl(key)
    if ttl_ms and int(str(ttl_ms)) > 0:
        out.write(
            f"{DIM}(the cooldown has {int(str(ttl_ms)) / 1000:.1f}s left; waiting for it){RESET}\n"
        )
    ends = time.monotonic() + limit_s
    while client.redis.exists(key) and time.monotonic() < ends:
        time.sleep(0.2)


def run_demo(client: Client, out: TextIO = sys.stdout, agent: str = "demo") -> list[dict[str, Any]]:
    """Submit the demo's jobs one after another and print their streams."""
    ask = [{"role": "user", "content": "Why do web apps run LLM calls in a job queue?"}]
    out.write(
        f"\n{BOLD}1. The primary fails three ways; the fallback answers; the cooldown starts."
        f"{RESET}\n"
    )
    results = [follow(client.submit(agent, ask), "job 1", out)]
    out.write(
        f"\n{BOLD}2. Inside the cooldown every worker starts this agent at the fallback.{RESET}\n"
    )
    results.append(follow(client.submit(agent, ask), "job 2", out))
    out.write(f"\n{BOLD}3. The cooldown expires; the job starts at the recovered primary.{RESET}\n")
    wait_for_cooldown_end(client, agent, out)
    results.append(follow(client.submit(agent, ask), "job 3", out))
    out.write(f"\n{BOLD}4. A job cancelled mid-stream stops at once.{RESET}\n")
    job = client.submit(agent, ask)
    results.append(follow(job, "job 4", out, cancel_after_deltas=5, client=client))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.demo", description=__doc__)
    parser.add_argument("--agent", default="demo")
    args = parser.parse_args(argv)
    client = Client(settings=Settings())
    try:
        results = run_demo(client, agent=args.agent)
    finally:
        client.close()
    expected = ["completed", "completed", "completed", "failed"]
    return 0 if [r["type"] for r in results] == expected else 1


if __name__ == "__main__":
    sys.exit(main())
