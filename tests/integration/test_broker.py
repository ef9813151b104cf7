"""The enqueue path: the broker transport (one Redis client per channel) and the client's
Celery app."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Queue

from settings import Settings
from worker import broker
from worker.celery import create_app
from worker.client import Client


@pytest.fixture
def queue_name(redis_client: redis.Redis) -> Iterator[str]:
    name = f"reliever-test-broker-{uuid.uuid4().hex[:8]}"
    yield name
    for key in redis_client.scan_iter(match=f"*{name}*"):
        redis_client.delete(key)


def settings_for(broker_url: str, queue: str = "q") -> Settings:
    return Settings(_env_file=None, environment="test", redis_url=broker_url, queue=queue)


@pytest.mark.parametrize("scheme", ["redis", "rediss"])
def test_redis_urls_get_the_shared_client_transport_and_keep_their_scheme(scheme: str) -> None:
    """The URL keeps its scheme: kombu's TLS default for rediss stays on, and Flower (which
    reads the scheme of ``as_uri()``) still sees a Redis broker."""
    app = create_app(settings_for(f"{scheme}://127.0.0.1:6379/15"))
    conn = app.connection_for_write()
    try:
        assert isinstance(conn.transport, broker.Transport)
        assert conn.as_uri().startswith(f"{scheme}://")
        assert bool(conn.ssl) is (scheme == "rediss")
    finally:
        conn.release()


def test_other_brokers_keep_kombus_choice(redis_url: str) -> None:
    broker.install()
    with Connection("memory://") as conn:
        assert not isinstance(conn.transport, broker.Transport)
    with Connection("sentinel://127.0.0.1:26379") as conn:
        assert not isinstance(conn.transport, broker.Transport)


def test_a_channel_sends_its_commands_through_one_client(redis_url: str, queue_name: str) -> None:
    """Publishing, unacked bookkeeping and acks reuse one client, on the channel's pool; a
    new pool (kombu replaces it after a connection error) gets a new client."""
    broker.install()
    with Connection(redis_url) as conn:
        channel: Any = conn.default_channel
        assert isinstance(channel, broker.Channel)
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
            assert first.connection_pool is channel.pool
        given = redis.Redis.from_url(redis_url)
        with channel.conn_or_acquire(given) as passed:
            assert passed is given
        given.close()

        channel._disconnect_pools()
        with channel.conn_or_acquire() as after:
            assert after is not first
            assert after.connection_pool is channel.pool
            assert after.ping()


def test_messages_go_through_and_are_acked(redis_url: str, queue_name: str) -> None:
    """A message published and consumed with acks: the unacked entry is written on
    delivery and removed by the ack, through the shared client."""
    queue = Queue(queue_name)
    broker.install()
    with Connection(redis_url) as conn:
        producer = conn.Producer()
        for n in range(3):
            producer.publish({"n": n}, routing_key=queue_name, declare=[queue])
        got: list[Any] = []
        tags: list[str] = []
        channel: Any = conn.default_channel
        client = redis.Redis.from_url(redis_url)

        def take(body: Any, message: Any) -> None:
            assert client.hexists(channel.unacked_key, message.delivery_tag)
            tags.append(message.delivery_tag)
            got.append(body)
            message.ack()

        try:
            with conn.Consumer(queue, callbacks=[take], prefetch_count=1):
                for _ in range(3):
                    conn.drain_events(timeout=5)

            assert got == [{"n": 0}, {"n": 1}, {"n": 2}]
            assert not any(client.hexists(channel.unacked_key, tag) for tag in tags)
        finally:
            client.close()


def test_the_app_and_the_client_use_the_transport(redis_url: str) -> None:
    app = create_app(settings_for(redis_url))
    with app.connection_for_write() as conn:
        assert isinstance(conn.default_channel, broker.Channel)
    client = Client(settings=settings_for(redis_url))
    try:
        with client._celery().connection_for_write() as conn:
            assert isinstance(conn.default_channel, broker.Channel)
    finally:
        client.close()


def test_submitting_subscribes_to_nothing(
    redis_url: str, redis_client: redis.Redis, queue_name: str
) -> None:
    """The client reads results from reliever's keys: a submit queues the job and sends no
    SUBSCRIBE to the job's Celery result channel (nor the UNSUBSCRIBE after it)."""
    client = Client(settings=settings_for(redis_url, queue=queue_name))

    def subscribes() -> int:
        stats: dict[str, Any] = redis_client.info("commandstats")
        return int(stats.get("cmdstat_subscribe", {}).get("calls", 0))

    submits = 20
    try:
        client.submit("support", [{"role": "user", "content": "warm-up"}])
        before = subscribes()
        for n in range(submits):
            client.submit("support", [{"role": "user", "content": f"hi {n}"}])

        # The counter is the server's: another process sharing this Redis may subscribe
        # meanwhile. Celery's result backend sent one SUBSCRIBE per submit.
        assert subscribes() - before < submits
        assert redis_client.llen(queue_name) == submits + 1
    finally:
        client.close()


def test_flower_reads_the_queue_length_through_the_apps_broker_url(
    redis_url: str, redis_client: redis.Redis, queue_name: str
) -> None:
    """Flower picks its broker client from the scheme of the app's connection URI (its
    Broker page and /api/queues/length): the transport must leave that URI a redis:// one."""
    from flower.utils.broker import Broker

    settings = settings_for(redis_url, queue=queue_name)
    client = Client(settings=settings)
    try:
        client.submit("support", [{"role": "user", "content": "queued"}])
        app = create_app(settings)
        uri = app.connection_for_write().as_uri(include_password=True)

        lengths = asyncio.run(Broker(uri).queues([queue_name]))

        assert lengths == [{"name": queue_name, "messages": 1}]
    finally:
        client.close()


def test_more_concurrent_commands_than_broker_connections_wait_instead_of_failing(
    redis_url: str, queue_name: str
) -> None:
    """Thirty threads each holding a broker connection (a 0.2 s BLPOP) on a channel whose
    pool has ten: the others wait their turn, none fails (kombu's own pool raises
    MaxConnectionsError, which failed acks of jobs finishing together under gevent)."""
    app = create_app(settings_for(redis_url, queue_name))
    failures: list[BaseException] = []
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        assert channel.pool.max_connections == 10

        def hold() -> None:
            try:
                with channel.conn_or_acquire() as client:
                    client.blpop(f"{queue_name}-never", timeout=0.2)
            except BaseException as exc:  # collected for the assertion
                failures.append(exc)

        threads = [threading.Thread(target=hold) for _ in range(30)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert failures == []
