"""Messages a worker took from the queue but died before leasing their job: restored.

kombu's Redis transport keeps every delivered, unacknowledged message in its ``unacked``
hash (and its delivery time in ``unacked_index``) until the task is acknowledged; it
puts one back only after the visibility timeout (an hour). A job's lease covers it from
the moment its run starts, and the reaper re-enqueues a leased job whose worker died
(``worker.lease``); the instants between the delivery and the lease are covered here.

Every reap, each worker looks at the messages delivered more than ``older_than_s`` ago
(the lease TTL: a live worker has leased its job long before): one whose job has no
lease, is not listed as running and has no result was taken by a worker that is gone,
and is put back on its queue with kombu's own restore. Should the worker be alive after
all (a Redis outage held it up), the copy is harmless: a job runs once under its lease,
and a job that ended returns its stored result.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

from worker.dead import job_id_in_body

PAGE = 1000
"""Tags read from the delivery-time index per round trip."""
SCAN_LIMIT = 20_000
"""The most old messages one sweep walks (the oldest first)."""
CHECK_LIMIT = 500
"""The most messages one sweep reads and checks (those not known to be leased)."""


def _job_id_of(envelope: Any) -> str | None:
    """The job id a delivered message carries (the job's own, else the task's)."""
    if not isinstance(envelope, dict):
        return None
    try:
        body = json.loads(base64.b64decode(envelope.get("body") or ""))
    except (ValueError, TypeError, RecursionError):
        body = None
    headers = envelope.get("headers")
    task_id = headers.get("id") if isinstance(headers, dict) else None
    return job_id_in_body(body, task_id if isinstance(task_id, str) else None)


class OrphanSweep:
    """Finds and restores orphaned messages on one kombu Redis channel.

    A message once found leased stays known until it leaves kombu's index (its task
    was acknowledged): its job is leased or listed from then on, and the lease's reaper
    covers it. So a sweep reads and checks only new old messages, however many long
    jobs run.

    Args:
        channel: a channel of the broker connection (kombu's Redis transport).
        claimed: for a list of job ids, whether each is leased, running or ended.
        older_than_s: how long after its delivery an unleased message is an orphan.
    """

    def __init__(
        self, channel: Any, claimed: Callable[[list[str]], list[bool]], *, older_than_s: float
    ) -> None:
        self._channel = channel
        self._claimed = claimed
        self._older_than_s = older_than_s
        self._leased: set[bytes] = set()

    def _old_tags(self) -> list[bytes]:
        client = self._channel.client
        until = time.time() - self._older_than_s
        tags: list[bytes] = []
        while len(tags) < SCAN_LIMIT:
            page: list[bytes] = client.zrangebyscore(
                self._channel.unacked_index_key, "-inf", until, start=len(tags), num=PAGE
            )
            tags += page
            if len(page) < PAGE:
                break
        return tags

    def sweep(self) -> list[str]:
        """Restore the orphans found now; their job ids."""
        channel = self._channel
        client = channel.client
        old = self._old_tags()
        self._leased &= set(old)
        tags = [tag for tag in old if tag not in self._leased][:CHECK_LIMIT]
        if not tags:
            return []
        found: list[tuple[bytes, str]] = []
        for tag, raw in zip(tags, client.hmget(channel.unacked_key, tags), strict=True):
            if raw is None:
                continue  # acknowledged meanwhile
            try:
                envelope = json.loads(raw)[0]
            except (ValueError, TypeError, IndexError, KeyError, RecursionError):
                continue
            job_id = _job_id_of(envelope)
            if job_id is not None:
                found.append((tag, job_id))
        restored: list[str] = []
        flags = self._claimed([job_id for _tag, job_id in found])
        for (tag, job_id), claimed in zip(found, flags, strict=True):
            if claimed:
                self._leased.add(tag)
                continue
            channel.qos.restore_by_tag(tag, client=client)
            restored.append(job_id)
        return restored
