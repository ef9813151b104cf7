"""The floor under the capacity load: bare httpx + httpx-sse streams in one gevent process.

``python -m bench.floor_load --url URL --model M --streams N --out FILE``

What the worker's capacity is measured against: the same ``N`` slow streams from
``bench.ticker``, read in one process on gevent (the Procfile's pool) by
``httpx.Client`` + ``httpx_sse.connect_sse``, each chunk ``json.loads``-ed and its text's
send time subtracted from the time it was read. No Celery, no guard, no events, no Redis:
the least any Python worker on this stack spends per streamed chunk. It prints ``ready``
just before it starts the streams, over ``--spread-s`` (about as long as the worker's
submits take), so the caller can time its steady window as for the worker; once every
stream has ended it writes ``FILE`` (each token's send time and latency, per-stream errors)
and prints ``done``.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402 - after gevent's patching, as a gevent worker is
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import httpx  # noqa: E402
import httpx_sse  # noqa: E402

from bench.scenarios import chunk_texts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor_load")
    parser.add_argument("--url", required=True, help="the upstream's base URL (…/v1)")
    parser.add_argument("--model", required=True, help="the ticker's model, tick-{ms}-{count}")
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--spread-s", type=float, default=0.7)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    client = httpx.Client(
        timeout=httpx.Timeout(30.0),
        limits=httpx.Limits(max_connections=args.streams, max_keepalive_connections=args.streams),
    )
    body = {"model": args.model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    send: list[float] = []
    latency: list[float] = []
    errors: list[str] = []

    def stream() -> None:
        try:
            with httpx_sse.connect_sse(
                client, "POST", f"{args.url}/chat/completions", json=body
            ) as source:
                for sse in source.iter_sse():
                    for text in chunk_texts(sse.data):
                        now = time.time()
                        sent = float(text)
                        send.append(sent)
                        latency.append(now - sent)
        except Exception as exc:  # counted, reported with the results
            errors.append(type(exc).__name__)

    print("ready", flush=True)
    greenlets = []
    for _ in range(args.streams):
        greenlets.append(gevent.spawn(stream))
        gevent.sleep(args.spread_s / args.streams)
    gevent.joinall(greenlets)
    args.out.write_text(
        json.dumps({"send": send, "e2e": latency, "errors": errors}), encoding="utf-8"
    )
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
