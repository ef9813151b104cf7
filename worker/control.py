"""Cancellation across workers: a key that says so, and a channel that delivers it.

``cancel(job_id)`` sets ``{p}:cancel:{job}`` (so a job still queued ends cancelled when a
worker picks it up) and publishes the job id on ``{p}:control``. Every worker process
listens there and sets the :class:`~worker.clock.CancelToken` of the job if it runs it,
which wakes the job's wait or shuts its upstream socket within milliseconds.
"""

from __future__ import annotations

import logging
import threading

import redis

from worker.clock import CancelToken
from worker.keys import Keys

log = logging.getLogger(__name__)

CANCEL_KEY_TTL_S = 24 * 3600


def request_cancel(client: redis.Redis, keys: Keys, job_id: str) -> None:
    """Mark the job cancelled and tell whichever worker runs it."""
    pipe = client.pipeline(transaction=False)
    pipe.set(keys.cancel(job_id), "1", ex=CANCEL_KEY_TTL_S)
    pipe.publish(keys.control(), job_id)
    pipe.execute()


class CancelListener:
    """The process's cancel tokens by job id, fed by the control channel.

    A job may have more than one token here for a moment (a duplicate delivery registers
    before it learns that the job runs already); a cancel reaches them all.
    """

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._redis = client
        self._keys = keys
        self._tokens: dict[str, list[CancelToken]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self, job_id: str, token: CancelToken) -> None:
        """Deliver cancels of ``job_id`` published from now on to ``token``.

        A cancel published before is not delivered: the caller reads the job's cancel
        key after registering (``Leases.acquire`` does).
        """
        with self._lock:
            self._tokens.setdefault(job_id, []).append(token)

    def unregister(self, job_id: str, token: CancelToken) -> None:
        """Stop delivering to ``token`` (other tokens of the job stay)."""
        with self._lock:
            tokens = self._tokens.get(job_id, [])
            if token in tokens:
                tokens.remove(token)
            if not tokens:
                self._tokens.pop(job_id, None)

    def deliver(self, job_id: str) -> None:
        with self._lock:
            tokens = list(self._tokens.get(job_id, ()))
        for token in tokens:
            token.cancel()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="reliever-cancel", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self._keys.control())
                # Tokens registered while the subscription was down may have missed a
                # message: their keys are the truth.
                with self._lock:
                    pending = list(self._tokens)
                for job_id in pending:
                    if self._redis.exists(self._keys.cancel(job_id)):
                        self.deliver(job_id)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        data = message["data"]
                        self.deliver(data.decode() if isinstance(data, bytes) else str(data))
            except redis.RedisError as exc:
                log.warning("cancel listener: Redis error %s; resubscribing", type(exc).__name__)
                self._stop.wait(1.0)
            finally:
                pubsub.close()
