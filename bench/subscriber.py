"""Measures delta latency for the capacity runs from the live channel.

``python -m bench.subscriber --redis URL --prefix P --jobs N --cap-s S --out FILE``

Pattern-subscribes to ``{P}:events:*`` (the live pub/sub channel every event goes to) and,
for each ``delta`` whose text carries ``bench.ticker`` send times, records per token:

* ``e2e``: receive time here minus the upstream's send time (the whole path: upstream ->
  worker -> Redis -> subscriber, coalescing wait included);
* ``to_ts``: the event's ``ts`` minus the send time (upstream -> the worker stamping it);

and per event ``from_ts``: receive time minus ``ts``; per job ``first_delta``: the epoch time
its first delta arrived (the in-process run's time to first delta for the Redis sink). It
stops after ``N`` terminal events, ``S`` seconds or a message on ``{P}:events:_stop``, and
writes the samples (and seq gaps, terminal counts) as JSON. One process
and one connection for all jobs, so that the measuring side stays cheap.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import redis


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.subscriber")
    parser.add_argument("--redis", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--cap-s", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    client = redis.Redis.from_url(args.redis)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(f"{args.prefix}:events:*")
    # Wait for the subscription to be confirmed before saying so.
    pubsub.get_message(timeout=1.0)
    print("subscribed", flush=True)

    send: list[float] = []
    e2e: list[float] = []
    to_ts: list[float] = []
    from_ts: list[float] = []
    last_seq: dict[str, int] = {}
    gaps = 0
    deltas = 0
    first_delta: dict[str, float] = {}
    terminals: dict[str, int] = {"completed": 0, "failed": 0}
    failures: list[Any] = []
    ends = time.monotonic() + args.cap_s
    while sum(terminals.values()) < args.jobs and time.monotonic() < ends:
        message = pubsub.get_message(timeout=0.5)
        if message is None or message.get("type") != "pmessage":
            continue
        received = time.time()
        if message["channel"].endswith(b":events:_stop"):
            break
        event = json.loads(message["data"])
        job = event["job_id"]
        seq = event["seq"]
        if job in last_seq and seq != last_seq[job] + 1:
            gaps += 1
        last_seq[job] = seq
        kind = event["type"]
        if kind == "delta":
            deltas += 1
            first_delta.setdefault(job, received)
            ts = event["ts"]
            from_ts.append(received - ts)
            for word in event.get("text", "").split():
                try:
                    sent = float(word)
                except ValueError:
                    continue
                send.append(sent)
                e2e.append(received - sent)
                to_ts.append(ts - sent)
        elif kind in terminals:
            terminals[kind] += 1
            if kind == "failed" and len(failures) < 5:
                failures.append(event.get("error"))
    pubsub.close()
    client.close()
    args.out.write_text(
        json.dumps(
            {
                "send": send,
                "e2e": e2e,
                "to_ts": to_ts,
                "from_ts": from_ts,
                "delta_events": deltas,
                "seq_gaps": gaps,
                "jobs_seen": len(last_seq),
                "first_delta": first_delta,
                "terminals": terminals,
                "failures": failures,
                "timed_out": sum(terminals.values()) < args.jobs,
            }
        ),
        encoding="utf-8",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
