"""kombu's Redis transport, with one Redis client per channel instead of one per command,
and every popped message vetted before kombu decodes it.

kombu builds a new ``redis.Redis`` for every command it sends outside its polling loop:
the unacked entry of each delivered task, each task event, each ack, and on the enqueuing
side the job's LPUSH and its ``task-sent`` event. With redis-py 8 a new client costs about
0.1 ms of CPU (it copies its table of response callbacks), four to six times a job, two of
them on the way to its first token. A ``redis.Redis`` is safe to share between threads
and greenlets (each command takes a connection from the pool), so a channel keeps one, on
the channel's own pool, and builds it again when kombu replaces that pool.

:func:`install` (called by ``create_app``) makes it the transport of ``redis://`` and
``rediss://`` URLs in the process, through kombu's table of URL schemes; the URL is parsed
as kombu's own Redis transport parses it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from typing import Any, ClassVar

import kombu.transport
import redis
from kombu.transport import redis as kombu_redis
from kombu.utils import json as kombu_json
from kombu.utils.encoding import bytes_to_str

from worker.dead import lost_connection_errors, stand_in, vet_envelope

log = logging.getLogger(__name__)

TRANSPORT = "worker.broker:Transport"
"""The transport's name in kombu's alias table."""
SCHEMES = ("redis", "rediss")
"""The broker URL schemes it serves (others, ``sentinel://`` among them, keep kombu's)."""


POOL_TIMEOUT_S = 10.0
"""The longest a command outside the polling loop waits for a free broker connection."""

MAX_MESSAGE_BYTES = "reliever_max_message_bytes"
"""The transport option bounding a message popped from the queue (``celery_config``)."""
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class Channel(kombu_redis.Channel):
    """kombu's Redis channel; commands outside the polling loop share one client.

    Its pool blocks, bounded, when every connection is in use (as the worker's own Redis
    pool does, worker.runtime): kombu's plain pool raises ``MaxConnectionsError`` instead,
    which under gevent, with hundreds of jobs acknowledging at once, fails acks and drops
    the consumer's broker connection.
    """

    _shared_client: Any = None

    _popped: Any = None
    """The last popped item, its queue and its list's key (bytes, str, bytes)."""
    _rescued: ClassVar[list[tuple[bytes, bytes]]] = []
    """Items popped but not recorded as unacknowledged: (list key, item), process-wide."""
    _rescued_lock: ClassVar[threading.Lock] = threading.Lock()

    def _create_client(self, asynchronous: bool = False) -> Any:
        # mypy does not see kombu's _create_client (kombu defines it, untyped).
        client = super()._create_client(asynchronous=asynchronous)  # type: ignore[misc]
        if asynchronous:
            # The consumer's client: every popped message is vetted before kombu decodes
            # it, so no message can raise out of the consumer's loop (worker.dead).
            client.set_response_callback("BRPOP", self._vetted_brpop)
        return client

    def _vetted_brpop(self, response: Any, **_: Any) -> Any:
        if not response:
            return None
        dest, item = response
        queue = (dest.decode() if isinstance(dest, bytes) else str(dest)).rsplit(self.sep, 1)[0]
        client = self.connection.client
        options = (client.transport_options if client is not None else None) or {}
        max_bytes = int(options.get(MAX_MESSAGE_BYTES, DEFAULT_MAX_MESSAGE_BYTES))
        vetted = vet_envelope(
            item,
            queue,
            max_bytes,
            decode=lambda raw: kombu_json.loads(bytes_to_str(raw)),
            build=lambda envelope: self.Message(envelope, channel=self),
        )
        self._popped = (item, queue, dest)
        return dest, vetted

    def _brpop_start(self, timeout: Any = None) -> Any:
        self._push_back_rescued()
        return super()._brpop_start(timeout)  # type: ignore[misc]

    def _brpop_read(self, **options: Any) -> Any:
        """kombu's read of a popped message, made safe for the message.

        kombu pops an item, then records it as unacknowledged in a second round trip: an
        item in hand when Redis goes away in between is kept and pushed back onto its
        queue before the next pop. One kombu cannot take (the vetting missed a case)
        becomes a stand-in for the dead-letter list, not an error that ends the consumer
        with the message already off the queue.
        """
        self._popped = None
        lost_connection = lost_connection_errors(getattr(self, "connection_errors", ()))
        try:
            return super()._brpop_read(**options)  # type: ignore[misc]
        except Empty:
            raise
        except lost_connection:
            if self._popped is not None:
                item, _queue, dest = self._popped
                with self._rescued_lock:
                    self._rescued.append((dest, item))
                log.warning("a message taken as Redis went away is kept, to be put back")
            raise
        except Exception as exc:
            if self._popped is None:
                raise
            item, queue, _dest = self._popped
            detail = f"kombu could not take the message ({type(exc).__name__})"
            payload = kombu_json.loads(stand_in(item, queue, "bad_envelope", detail))
            self.connection._deliver(payload, queue)
            return True

    def _push_back_rescued(self) -> None:
        """Put the kept items back at the head of their queues (the next to be popped)."""
        with self._rescued_lock:
            if not self._rescued:
                return
            items, self._rescued[:] = list(self._rescued), []
        try:
            with self.conn_or_acquire() as client:
                pipe = client.pipeline(transaction=False)
                for dest, item in items:
                    pipe.rpush(dest, item)
                pipe.execute()
        except Exception:
            with self._rescued_lock:
                self._rescued[:0] = items
            raise
        log.warning("put back %d message(s) taken as Redis went away", len(items))

    def _deliver_fanout_message(self, message: Any, exchange: Any) -> Any:
        """A broadcast (remote control) message kombu cannot take is dropped, not raised."""
        try:
            return super()._deliver_fanout_message(message, exchange)  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - the consumer's loop must survive it
            log.warning(
                "a broadcast message was dropped: kombu cannot take it (%s)", type(exc).__name__
            )
            raise Empty() from None

    def _get_pool(self, asynchronous: bool = False) -> Any:
        # mypy does not see kombu's _get_pool (kombu defines it, untyped), nor types
        # redis-py's BlockingConnectionPool constructor.
        if self.connection.client is None:
            # The broker connection was lost and closed: kombu, closing the channel,
            # still asks for a pool to put unacknowledged messages back. A connection
            # error (which kombu ignores there) instead of its AttributeError, which
            # ended the worker; those messages come back through the lease reaper and
            # the orphan sweep.
            raise redis.ConnectionError("the broker connection is closed")
        if asynchronous:
            return super()._get_pool(asynchronous=True)  # type: ignore[misc]
        # kombu's own pool parameters (and its fanout prefix bookkeeping), in a blocking pool.
        plain = super()._get_pool()  # type: ignore[misc]
        return redis.BlockingConnectionPool(  # type: ignore[no-untyped-call]
            **plain.connection_kwargs,
            connection_class=plain.connection_class,
            max_connections=plain.max_connections,
            timeout=POOL_TIMEOUT_S,
        )

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        shared = self._shared_client
        if shared is None or shared.connection_pool is not pool:
            shared = self._shared_client = self._create_client()
        yield shared


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


def install() -> None:
    """Make :class:`Transport` the one kombu picks for ``redis://`` and ``rediss://`` URLs.

    Through kombu's alias table, not Celery's ``broker_transport`` setting: the URL keeps
    its scheme, so kombu's TLS default for ``rediss``, ``Connection.as_uri()`` (Flower's
    broker page reads its scheme) and failover URLs behave as with kombu's own transport.
    """
    for scheme in SCHEMES:
        if kombu.transport.TRANSPORT_ALIASES.get(scheme) != TRANSPORT:
            kombu.transport.TRANSPORT_ALIASES[scheme] = TRANSPORT
            # kombu caches the class it resolved for a scheme: a connection made before
            # this call must not keep the plain transport for later ones.
            kombu.transport._transport_cache.pop(scheme, None)  # type: ignore[attr-defined]
