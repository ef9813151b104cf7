"""LiteLLM's ``Router``, the peer reliever is measured against in-process (issue 5).

litellm is installed only by the ``bench`` extra (an exact pin; never a runtime or dev
dependency). Importing this module configures it to run offline and quietly, then imports it:

* ``LITELLM_LOCAL_MODEL_COST_MAP=True``: the bundled model cost map instead of fetching one
  at import;
* telemetry is opt-in in this version and stays off; the success/failure callback lists are
  emptied and debug output suppressed.

Its retry backoff cannot be set to reliever's: this version's Router computes it in its
native core (0.5 s · 2^k plus up to 0.75 s of jitter; the ``INITIAL_RETRY_DELAY``/``JITTER``
variables only reach the Python helper it no longer calls). So the failover section
records what the Router asked its host to sleep (``SLEEPS``) and compares the latency each
peer adds *beyond its own planned waits*.

An audit hook refuses any socket connect or name lookup outside loopback from then on, so a
run proves the peer needed no network (``outbound_attempts`` stays empty).

The Router gets the same two-model chain as reliever's agent: deployment group ``primary``
(one deployment) with fallback group ``fallback``, ``num_retries=2``, ``allowed_fails=2``
(the third failure of the primary cools it down, as reliever's exhausted retries arm its pin)
and ``cooldown_time=60``. State is in memory (no ``redis_url``), LiteLLM's cheapest
configuration. Never give a benchmark Router a Redis URL that others use: its
``flush_cache()`` runs ``FLUSHALL``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

for _name, _value in {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_TELEMETRY": "False",
}.items():
    os.environ[_name] = _value

OUTBOUND: list[str] = []
_LOOPBACK = ("127.", "localhost", "::1", "0.0.0.0")


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.connect":
        address = args[1]
        host = str(address[0]) if isinstance(address, tuple) else str(address)
        if host.startswith("/") or host.startswith(_LOOPBACK):
            return
    elif event == "socket.getaddrinfo":
        host = str(args[0])
        if host.startswith(_LOOPBACK):
            return
    else:
        return
    OUTBOUND.append(f"{event} {host}")
    raise OSError(f"bench: outbound network refused ({event} {host})")


sys.addaudithook(_audit)

import litellm  # noqa: E402  (configured through the environment above)
from litellm import Router  # noqa: E402
from litellm.router_python_host import PythonHost  # noqa: E402

litellm.suppress_debug_info = True
litellm.success_callback = []
litellm.failure_callback = []
litellm.callbacks = []
litellm.telemetry = False

# What the router asked to sleep between retries (its planned waits), in seconds.
SLEEPS: list[float] = []
_sleep_sync = PythonHost.sleep_sync


def _recording_sleep(self: PythonHost, seconds: float) -> None:
    SLEEPS.append(float(seconds))
    _sleep_sync(self, seconds)


PythonHost.sleep_sync = _recording_sleep  # type: ignore[method-assign]


def version() -> str:
    import importlib.metadata

    return importlib.metadata.version("litellm")


def settings() -> dict[str, Any]:
    return {
        "version": version(),
        "num_retries": 2,
        "allowed_fails": 2,
        "cooldown_time_s": 60,
        "fallbacks": "primary -> fallback",
        "state": "in memory",
        "env": {"LITELLM_LOCAL_MODEL_COST_MAP": os.environ["LITELLM_LOCAL_MODEL_COST_MAP"]},
        "backoff": "its own: 0.5 s * 2^k + jitter <= 0.75 s (native core, not configurable)",
        "outbound_attempts": OUTBOUND,
        "callbacks": "none",
    }


def make_router(base_url: str, primary: str, fallback: str) -> Router:
    """The two-model chain: group ``primary`` -> group ``fallback`` at ``base_url/v1``."""

    def deployment(group: str, model: str) -> dict[str, Any]:
        return {
            "model_name": group,
            "litellm_params": {
                "model": f"openai/{model}",
                "api_base": f"{base_url}/v1",
                "api_key": "sk-bench-dummy",
                "timeout": 30,
                "stream_timeout": 30,
            },
        }

    return Router(
        model_list=[deployment("primary", primary), deployment("fallback", fallback)],
        fallbacks=[{"primary": ["fallback"]}],
        num_retries=2,
        allowed_fails=2,
        cooldown_time=60,
    )


def reset_cooldowns(router: Router) -> None:
    """Forget the router's cooldowns and failure counts (in-memory state only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = [d["model_info"]["id"] for d in router.get_model_list()]
    store = router._cooldowns.cooldown_store
    for model_id in ids:
        store.evict_local(model_id)
    store.flush_local_counters()


def stream_once(router: Router, messages: list[dict[str, Any]]) -> tuple[float, float, int]:
    """(time to first content chunk, total time, content chunks) of one routed stream."""
    t0 = time.perf_counter()
    first = 0.0
    chunks = 0
    response: Iterator[Any] = router.completion(
        model="primary", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    for chunk in response:
        choices = chunk.choices
        if choices and choices[0].delta.content:
            chunks += 1
            if not first:
                first = time.perf_counter() - t0
    with contextlib.suppress(Exception):
        response.close()  # type: ignore[attr-defined]
    return first, time.perf_counter() - t0, chunks
