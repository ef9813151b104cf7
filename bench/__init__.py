"""reliever's benchmarks: ``python -m bench`` (see ``python -m bench --help``).

Every figure is measured side by side with its baseline in the same run, against loopback
upstreams on this machine, with fixed counts and wall-clock caps. Results go to a JSON file
and to ``docs/benchmarks.md``.

Modules:

* ``common``: statistics, machine facts, Redis namespaces, subprocesses and their RSS/CPU.
* ``inprocess``: the chain executor against a bare httpx + httpx-sse stream (issue 2).
* ``service``: through the queue with a real worker: latency and short-job throughput.
* ``capacity``: concurrent slow streams per worker process, delta latency, RSS, CPU; pools.
* ``ticker``: a timestamping OpenAI-compatible upstream for the capacity runs.
* ``subscriber``: a pub/sub listener that measures delta latency for the capacity runs.
* ``report``: the markdown tables.
"""
