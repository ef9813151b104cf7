"""reliever's benchmarks: ``python -m bench`` (see ``python -m bench --help``).

Every figure is measured side by side with its baseline in the same run, against loopback
upstreams on this machine, with fixed counts and wall-clock caps. Results go to a JSON file
and to ``docs/benchmarks.md``.

Modules:

* ``common``: statistics, machine facts, Redis namespaces, subprocesses and their RSS/CPU.
* ``inprocess``: the chain executor against a bare httpx + httpx-sse stream (issue 2), side
  by side with LiteLLM's Router and the openai SDK (issue 5).
* ``litellm_router``: LiteLLM's Router set up offline with reliever's chain (``bench`` extra).
* ``queue_peers``: through the queue, reliever's task against ``plain_celery``'s (issue 5).
* ``plain_celery``: the hand-written baseline, a Celery app with one openai-SDK task.
* ``failover``: primary always 503, fallback healthy: reliever and LiteLLM (issue 5).
* ``service``: through the queue with a real worker: latency, short-job throughput, delta
  events per second.
* ``capacity``: concurrent slow streams per worker process, delta latency, RSS, CPU; pools.
* ``ticker``: a timestamping OpenAI-compatible upstream for the capacity runs.
* ``subscriber``: a pub/sub listener that measures delta latency for the capacity runs and
  the first delta received for the in-process Redis sink.
* ``report``: the markdown tables.
"""
