"""The scenarios. Each one builds its own :class:`~chaos.rig.Rig`, submits jobs by the
documented protocol, injects its faults, and returns a :class:`~chaos.result.Result`.

Parameters are keyword arguments with the full run's values as defaults; ``QUICK`` holds
the ``--quick`` ones and the pytest subset passes its own.
"""

from __future__ import annotations

import json
import random
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import redis

from chaos import fuzz as fuzzing
from chaos import malformed as catalogue
from chaos import protocol
from chaos.ledger import QUIET_S, Fault, Ledger
from chaos.result import Check, Result, tally
from chaos.rig import Proc, Rig, model, rss_mb

FAST_BACKOFF = {"base": "50ms", "factor": 2, "max": "200ms", "jitter": 0}


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def reply(n: int, delay_s: float) -> dict[str, Any]:
    return {"type": "reply", "text": words(n), "delay_s": delay_s}


def stream_job(i: int, agent: str = "stream") -> dict[str, Any]:
    return {"agent": agent, "messages": [{"role": "user", "content": f"stream {i}"}]}


def plain_job(text: str) -> dict[str, Any]:
    return {"agent": "plain", "messages": [{"role": "user", "content": text}]}


def _agents(
    models: Mapping[str, Mapping[str, Any]], agents: Mapping[str, Mapping[str, Any]]
) -> Callable[[str], dict[str, Any]]:
    """An agents document for the mock's URL: ``models`` name -> extra model fields."""

    def doc(url: str) -> dict[str, Any]:
        return {
            "models": {name: model(url, name, **dict(extra)) for name, extra in models.items()},
            "agents": {name: dict(a) for name, a in agents.items()},
        }

    return doc


LENGTHS = {"short": 1 / 3, "stream": 1.0, "long": 2.0}
"""The streaming agents of :func:`_streams_rig`, their length against ``n_words``."""


def _streams_rig(name: str, log_dir: Path, *, n_words: int, delay_s: float, **rig: Any) -> Rig:
    """A rig whose agents ``short``, ``stream`` and ``long`` stream a third of, once and
    twice ``n_words`` tokens, ``delay_s`` apart, and whose agent ``plain`` answers at once
    (the mock's default reply)."""
    names = [*LENGTHS, "plain"]
    agents = _agents(
        {n: {} for n in names},
        {n: {"model": n, "retries": 2, "backoff": FAST_BACKOFF} for n in names},
    )
    steps = {n: [reply(max(1, round(n_words * f)), delay_s)] for n, f in LENGTHS.items()}
    return Rig(name, log_dir, agents=agents, mock_steps=steps, **rig)


def _lease_env(lease_ttl_s: float | None) -> dict[str, str]:
    return {} if lease_ttl_s is None else {"RELIEVER_LEASE_TTL_S": str(lease_ttl_s)}


def _wait_started(ledger: Ledger, job_ids: Sequence[str], timeout_s: float) -> bool:
    """Wait until each of ``job_ids`` published an event (or ended)."""

    def started() -> bool:
        ledger.poll()
        return all(ledger.has_events(j) for j in job_ids)

    return ledger.wait_for(started, timeout_s)


# --- 1. sigkill-loop -----------------------------------------------------------------------


def sigkill_loop(
    log_dir: Path,
    *,
    jobs: int = 150,
    every_s: float = 5.0,
    for_s: float = 45.0,
    n_words: int = 30,
    delay_s: float = 0.2,
    concurrency: int = 25,
    lease_ttl_s: float | None = None,
    grace_s: float = 180.0,
    seed: int = 7,
) -> Result:
    """Streaming jobs submitted over ``for_s`` while a worker is SIGKILLed every
    ``every_s`` (a new one started each time, so that two run)."""
    result = Result("sigkill-loop")
    rng = random.Random(seed)
    faults: list[Fault] = []
    with _streams_rig(
        "sigkill-loop",
        log_dir,
        n_words=n_words,
        delay_s=delay_s,
        concurrency=concurrency,
        env=_lease_env(lease_ttl_s),
    ) as rig:
        ledger = Ledger(rig.redis, rig.prefix, rig.queue)
        stop = threading.Event()
        problems: list[str] = []

        def monkey() -> None:
            began = time.monotonic()
            for k in range(1, int(for_s // every_s) + 1):
                if stop.wait(max(0.0, began + k * every_s - time.monotonic())):
                    return
                live = rig.workers.live()
                if not live:
                    problems.append(f"kill {k}: no live worker")
                    continue
                victim = rng.choice(live)
                at = time.time()
                rig.workers.kill(victim)
                faults.append(Fault(f"SIGKILL {victim.name}", at, at))
                try:
                    rig.workers.start(1)
                except RuntimeError as exc:
                    problems.append(f"kill {k}: the new worker did not start: {exc}")

        thread = threading.Thread(target=monkey, name="chaos-monkey", daemon=True)
        began = time.time()
        thread.start()
        try:
            for i in range(jobs):
                time.sleep(max(0.0, began + 0.9 * for_s * i / jobs - time.time()))
                ledger.submit(stream_job(i), "stream", f"kill-{i:04d}")
        except BaseException:
            stop.set()
            raise
        finally:
            thread.join()
        tally(result, rig, ledger, grace_s=grace_s, faults=faults)
    result.details["kills"] = [f"{f.label} at +{f.start - began:.1f}s" for f in faults]
    result.notes += problems
    result.checks.append(Check("SIGKILLs injected", bool(faults), f"{len(faults)} kills"))
    result.checks.append(
        Check("the kills hit running jobs", result.restarted > 0, f"{result.restarted} reruns")
    )
    return result


# --- 2. redis-kill / redis-shutdown ----------------------------------------------------------


def redis_restart(
    log_dir: Path,
    *,
    how: str = "kill",
    streams: int = 40,
    burst: int = 10,
    after: int = 10,
    n_words: int = 60,
    delay_s: float = 0.2,
    down_s: float = 5.0,
    concurrency: int = 25,
    lease_ttl_s: float | None = None,
    grace_s: float = 180.0,
    quiet_s: float = QUIET_S,
) -> Result:
    """Redis (append-only file, fsync always) SIGKILLed (``how="kill"``) or shut down with
    ``SHUTDOWN`` (``how="shutdown"``) while ``streams`` jobs of three lengths stream (some
    end during the outage, some go on long after) and ``burst`` more were just sent (they
    are being taken as it goes), then started again on its data after ``down_s``;
    ``after`` more jobs are submitted once it is back."""
    if how not in ("kill", "shutdown"):
        raise ValueError(f"how: kill or shutdown, not {how!r}")
    name = f"redis-{how}"
    result = Result(name)
    agents = list(LENGTHS)
    with _streams_rig(
        name,
        log_dir,
        n_words=n_words,
        delay_s=delay_s,
        concurrency=concurrency,
        aof=True,
        env=_lease_env(lease_ttl_s),
    ) as rig:
        ledger = Ledger(rig.redis, rig.prefix, rig.queue)
        ids = []
        for i in range(streams):
            agent = agents[i % len(agents)]
            ids.append(ledger.submit(stream_job(i, agent), agent, f"{how}-{i:04d}"))
            time.sleep(n_words * delay_s / 3 / streams)
        all_started = _wait_started(ledger, ids, 60)
        in_flight = len(ledger.pending())
        for i in range(burst):
            ledger.submit(stream_job(i, "short"), "sent at the fault", f"{how}-burst-{i:04d}")
        start = time.time()
        if how == "kill":
            rig.redis_server.kill()
        else:
            rig.redis_server.shutdown()
        time.sleep(down_s)
        rig.redis_server.start()
        end = time.time()
        for i in range(after):
            ledger.submit(stream_job(i, "short"), "after the restart", f"{how}-after-{i:04d}")
        tally(
            result, rig, ledger, grace_s=grace_s, quiet_s=quiet_s, faults=[Fault(name, start, end)]
        )
    result.details["in flight at the fault"] = in_flight
    result.details["down for"] = f"{end - start:.1f}s"
    result.checks.append(
        Check(
            "every stream had started at the fault",
            all_started,
            f"{in_flight} of {streams} still running",
        )
    )
    return result


# --- 3. client-pause -------------------------------------------------------------------------


def client_pause(
    log_dir: Path,
    *,
    streams: int = 40,
    pauses_ms: Sequence[int] = (3000, 5000),
    gap_s: float = 4.0,
    n_words: int = 100,
    delay_s: float = 0.2,
    concurrency: int = 25,
    grace_s: float = 180.0,
) -> Result:
    """``CLIENT PAUSE`` for each of ``pauses_ms`` while ``streams`` jobs stream."""
    result = Result("client-pause")
    faults: list[Fault] = []
    with _streams_rig(
        "client-pause", log_dir, n_words=n_words, delay_s=delay_s, concurrency=concurrency
    ) as rig:
        ledger = Ledger(rig.redis, rig.prefix, rig.queue)
        ids = [ledger.submit(stream_job(i), "stream", f"pause-{i:04d}") for i in range(streams)]
        all_started = _wait_started(ledger, ids, 60)
        for ms in pauses_ms:
            at = time.time()
            rig.redis.client_pause(ms)
            faults.append(Fault(f"CLIENT PAUSE {ms}", at, at + ms / 1000))
            time.sleep(ms / 1000 + gap_s)
        in_flight = len(ledger.pending())
        tally(result, rig, ledger, grace_s=grace_s, faults=faults)
    result.checks.append(Check("every stream was running", all_started, f"{streams} streams"))
    result.details["still running after the pauses"] = in_flight
    return result


# --- 4. sigstop ------------------------------------------------------------------------------


def sigstop(
    log_dir: Path,
    *,
    victim_jobs: int = 10,
    other_jobs: int = 10,
    n_words: int = 60,
    delay_s: float = 0.2,
    lease_ttl_s: float = 3.0,
    stopped_s: float = 8.0,
    concurrency: int = 25,
    grace_s: float = 120.0,
) -> Result:
    """A worker running ``victim_jobs`` streams is SIGSTOPped for ``stopped_s`` (past its
    lease TTL: the other worker reruns its jobs), then SIGCONTed: it must write nothing
    into those jobs' logs any more."""
    result = Result("sigstop")
    env = _lease_env(lease_ttl_s)
    with _streams_rig(
        "sigstop",
        log_dir,
        n_words=n_words,
        delay_s=delay_s,
        concurrency=concurrency,
        env=env,
        start_workers=False,
    ) as rig:
        ledger = Ledger(rig.redis, rig.prefix, rig.queue)
        (victim,) = rig.workers.start(1)
        victims = [
            ledger.submit(stream_job(i), "victim", f"stop-v{i:03d}") for i in range(victim_jobs)
        ]
        on_victim = _wait_started(ledger, victims, 60)
        rig.workers.start(1)
        for i in range(other_jobs):
            ledger.submit(stream_job(i), "other", f"stop-o{i:03d}")
        at = time.time()
        victim.signal(signal.SIGSTOP)
        time.sleep(stopped_s)
        victim.signal(signal.SIGCONT)
        resumed = time.time()
        verdicts = tally(result, rig, ledger, grace_s=grace_s, faults=[Fault("SIGSTOP", at, at)])
        alive = victim.alive()
        stale = _lines_after(victim, resumed, "another worker took it over|lease lost")
    rerun = sum(1 for j in victims if verdicts[j].restarted)
    result.checks.append(
        Check("the stopped worker held its jobs", on_victim, f"{victim_jobs} jobs")
    )
    result.checks.append(
        Check(
            "every job of the stopped worker was rerun",
            rerun == victim_jobs,
            f"{rerun} of {victim_jobs}",
        )
    )
    result.checks.append(Check("the stopped worker lives on after SIGCONT", alive, victim.name))
    result.details["stopped worker's lines on its lost runs after SIGCONT"] = stale
    return result


def _lines_after(proc: Proc, since: float, pattern: str) -> int:
    """How many lines of ``proc``'s log match ``pattern`` (its lines after ``since`` only,
    judged by the log's own timestamps)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
    found = re.compile(pattern)
    return sum(
        1 for line in proc.output().splitlines() if line[:19] >= stamp and found.search(line)
    )


# --- 5. malformed ----------------------------------------------------------------------------


SETTLE_S = 1.0
"""How long a malformed entry must have been gone (not queued, not unacked) and its valid
job ended before the next entry goes: a worker dying on it hands it back to the queue."""


def malformed(
    log_dir: Path,
    *,
    names: Sequence[str] | None = None,
    item_timeout_s: float = 20.0,
    concurrency: int = 8,
) -> Result:
    """Each entry of the malformed catalogue pushed onto the queue, then a valid job."""
    result = Result("malformed")
    items = catalogue.by_name(list(names) if names is not None else None)
    rows: list[dict[str, Any]] = []
    counted: list[str] = []
    with _streams_rig("malformed", log_dir, n_words=5, delay_s=0.0, concurrency=concurrency) as rig:
        ledger = Ledger(rig.redis, rig.prefix, rig.queue)
        for n, item in enumerate(items):
            rows.append(_malformed_entry(rig, ledger, n, item, item_timeout_s, counted))
        tally(result, rig, ledger, grace_s=5.0, quiet_s=5.0, job_ids=counted)
    result.details["catalogue"] = rows
    back = [row["item"] for row in rows if row["handed back"]]
    if back:
        result.notes.append(
            "entries a dying worker handed back to the queue for the next worker to die on "
            f"(taken off by the harness): {', '.join(back)}"
        )
    stuck = [row["item"] for row in rows if row["stuck"]]
    if stuck:
        result.notes.append(
            f"entries still going round after {item_timeout_s:.0f}s without a worker exit "
            f"(taken off by the harness): {', '.join(stuck)}"
        )
    return result


def _malformed_entry(
    rig: Rig, ledger: Ledger, n: int, item: catalogue.Item, timeout_s: float, counted: list[str]
) -> dict[str, Any]:
    """Push ``item`` and a valid job; wait until both are dealt with; the catalogue's row.

    An entry that is still queued or unacked after ``timeout_s`` is taken off, and the
    valid job gets ``timeout_s`` more.
    """
    exits_before = len(rig.workers.exits)
    marks = {proc.name: proc.size() for proc in rig.workers.live()}
    task_id = f"mal-{n:02d}-{item.name}"
    raw = item.build(rig.queue, task_id)
    began = time.monotonic()
    protocol.push(rig.redis, rig.queue, raw)
    if item.carries_id:
        counted.append(ledger.add(task_id, f"malformed:{item.name}"))
    valid = ledger.submit(plain_job(f"after {item.name}"), "valid", f"ok-{n:02d}")
    counted.append(valid)
    purged = came_back = 0
    clean_since: float | None = None

    def settled() -> bool:
        """The entry is gone and its valid job ended (for :data:`SETTLE_S`). After a
        worker exit the entry is taken off the queue (it would kill the next worker)."""
        nonlocal purged, came_back, clean_since
        ledger.poll()
        rig.workers.notice()
        copies = _copies(rig.redis, rig.queue, raw)
        if any(copies) and len(rig.workers.exits) > exits_before:
            came_back += int(copies[0] > 0)
            purged += _purge(rig.redis, rig.queue, raw)
            copies = _copies(rig.redis, rig.queue, raw)
        if any(copies) or valid in ledger.pending() or _dying(rig, marks):
            clean_since = None
            return False
        clean_since = clean_since or time.monotonic()
        return time.monotonic() - clean_since >= SETTLE_S

    quiet = ledger.wait_for(settled, timeout_s)
    stuck = not quiet and any(_copies(rig.redis, rig.queue, raw))
    if stuck:
        # Going round without killing anyone (a consumer that reconnects on it, say).
        purged += _purge(rig.redis, rig.queue, raw)
        quiet = ledger.wait_for(settled, timeout_s)
    rig.workers.notice()
    verdicts = ledger.verdicts()
    mal = verdicts.get(task_id)
    return {
        "item": item.name,
        "what": item.what,
        "carries id": item.carries_id,
        "worker exits": [f"{e.name} rc={e.returncode}" for e in rig.workers.exits[exits_before:]],
        "valid job": verdicts[valid].outcome or "no terminal",
        "malformed": "-" if mal is None else mal.outcome or f"{mal.events} event(s), no terminal",
        "seconds": round(time.monotonic() - began, 1),
        "settled": quiet,
        "handed back": came_back > 0,
        "stuck": stuck,
        "purged": purged,
    }


def _dying(rig: Rig, marks: Mapping[str, int]) -> bool:
    """Whether a live worker has logged its end (Celery's "Unrecoverable error") since
    ``marks`` (worker -> log size) and is still on its way out."""
    return any(
        "Unrecoverable error" in proc.output(marks.get(proc.name, 0)) for proc in rig.workers.live()
    )


def _identity(raw: bytes) -> tuple[Any, Any]:
    """(task id, delivery tag) of a queue entry; (None, None) when it has neither."""
    try:
        message = json.loads(raw)
    except ValueError:
        return None, None
    if not isinstance(message, dict):
        return None, None
    headers, properties = message.get("headers"), message.get("properties")
    task_id = headers.get("id") if isinstance(headers, dict) else None
    tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
    return task_id, tag


def _same(raw: bytes) -> Callable[[bytes], bool]:
    """Whether a queue entry is ``raw``, as pushed or as a worker handed it back (the same
    task id or delivery tag)."""
    task_id, tag = _identity(raw)

    def same(entry: bytes) -> bool:
        other_id, other_tag = _identity(entry)
        return (
            entry == raw
            or (task_id is not None and other_id == task_id)
            or (tag is not None and other_tag == tag)
        )

    return same


def _unacked(client: redis.Redis) -> dict[bytes, bytes]:
    """kombu's unacked messages: delivery tag -> the message (JSON)."""
    return {
        tag: json.dumps(json.loads(value)[0]).encode()  # [message, exchange, routing key]
        for tag, value in client.hgetall("unacked").items()
    }


def _copies(client: redis.Redis, queue: str, raw: bytes) -> tuple[int, int]:
    """How many copies of ``raw`` are queued, and how many unacked."""
    same = _same(raw)
    queued = sum(1 for entry in client.lrange(queue, 0, -1) if same(entry))
    return queued, sum(1 for message in _unacked(client).values() if same(message))


def _purge(client: redis.Redis, queue: str, raw: bytes) -> int:
    """Take ``raw`` off the queue and out of kombu's unacked hash; how many copies went."""
    same = _same(raw)
    removed = 0
    for entry in client.lrange(queue, 0, -1):
        if same(entry):
            removed += int(client.lrem(queue, 0, entry))
    for tag, message in _unacked(client).items():
        if same(message):
            removed += int(client.hdel("unacked", tag))
            client.zrem("unacked_index", tag)
    return removed


# --- 6. fuzz ---------------------------------------------------------------------------------


def fuzz(
    log_dir: Path,
    *,
    jobs: int = 2000,
    seed: int = 20_250_601,
    concurrency: int = 25,
    grace_s: float = 600.0,
    quiet_s: float = QUIET_S,
) -> Result:
    """``jobs`` hostile jobs (``chaos.fuzz``), each must end with one terminal event."""
    result = Result("fuzz")
    generated = fuzzing.generate(jobs, seed)
    with _streams_rig("fuzz", log_dir, n_words=5, delay_s=0.0, concurrency=concurrency) as rig:
        ledger = Ledger(rig.redis, rig.prefix, rig.queue)
        for i, (label, job) in enumerate(generated):
            task_id = f"fz-{i:05d}"
            if protocol.expected_job_id(job, task_id) != task_id:
                # A valid id of its own: made unique, so that each job is one job.
                job["job_id"] = f"{job['job_id']}-{i}"
            ledger.submit(job, label, task_id)
        tally(result, rig, ledger, grace_s=grace_s, quiet_s=quiet_s)
    result.details["seed"] = seed
    return result


# --- 7. upstream-faults ------------------------------------------------------------------------

FAULT_MIX: tuple[dict[str, Any], ...] = (
    {"type": "status", "code": 503},
    {"type": "status", "code": 429},
    {"type": "status", "code": 500},
    {"type": "cut", "after_chunks": 3},
    {"type": "idle", "after_chunks": 2, "seconds": 3},
    {"type": "garbage", "after_chunks": 2},
    {"type": "no_end_marker", "after_chunks": 4},
    {"type": "stream_error", "after_chunks": 1},
    {"type": "stall", "seconds": 3, "before": "first_token"},
    reply(20, 0.05),
)


def upstream_faults(
    log_dir: Path,
    *,
    jobs: int = 120,
    huge_jobs: int = 4,
    huge_mb: int = 32,
    rss_bound_mb: float = 300.0,
    concurrency: int = 25,
    grace_s: float = 180.0,
) -> Result:
    """Jobs through the mock's fault mix (one fault per request, in turn), a few of them
    answered by one huge event of ``huge_mb`` MB; each worker's RSS stays under
    ``rss_bound_mb``."""
    result = Result("upstream-faults")
    agents = _agents(
        {"faulty": {"timeouts": {"first_token": "2s", "idle": "1s"}}, "backup": {}, "huge": {}},
        {
            "faults": {"model": "faulty", "fallbacks": ["backup"], "backoff": FAST_BACKOFF},
            "huge": {"model": "huge", "fallbacks": ["backup"], "retries": 0},
        },
    )
    steps = {
        "faulty": list(FAULT_MIX) * (jobs * 3 // len(FAULT_MIX) + 1),
        "huge": [{"type": "reply", "text": "x" * (huge_mb * 1024 * 1024)}],
    }
    with Rig(
        "upstream-faults", log_dir, agents=agents, mock_steps=steps, concurrency=concurrency
    ) as rig:
        sampler = RssSampler(rig)
        ledger = Ledger(rig.redis, rig.prefix, rig.queue)
        huge_every = max(1, jobs // max(1, huge_jobs))
        with sampler:
            for i in range(jobs):
                ledger.submit(
                    {"agent": "faults", "messages": [{"role": "user", "content": f"f {i}"}]},
                    "faults",
                    f"up-{i:04d}",
                )
                if i % huge_every == 0 and i // huge_every < huge_jobs:
                    ledger.submit(
                        {"agent": "huge", "messages": [{"role": "user", "content": "big"}]},
                        "huge-event",
                        f"huge-{i:04d}",
                    )
            tally(result, rig, ledger, grace_s=grace_s)
    result.details["RSS MB per worker (first sample, highest sample, VmHWM)"] = {
        name: (round(sampler.first[name]), round(peak), round(sampler.hwm.get(name, 0.0)))
        for name, peak in sampler.peak.items()
    }
    over = {n: round(p) for n, p in sampler.highest().items() if p > rss_bound_mb}
    result.checks.append(
        Check(
            f"RSS per worker under {rss_bound_mb:.0f} MB",
            not over,
            f"over: {over}" if over else "held",
        )
    )
    return result


class RssSampler:
    """Samples every live worker of ``rig`` every 0.1 s: its VmRSS (the first and the
    highest seen) and its VmHWM, the kernel's record of its peak RSS, which a spike
    between two samples cannot escape."""

    def __init__(self, rig: Rig, interval_s: float = 0.1) -> None:
        self._rig = rig
        self._interval_s = interval_s
        self.first: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self.hwm: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="chaos-rss", daemon=True)

    def sample(self) -> None:
        for proc in self._rig.workers.live():
            mb, hwm = rss_mb(proc.pid), rss_mb(proc.pid, "VmHWM")
            self.first.setdefault(proc.name, mb)
            self.peak[proc.name] = max(self.peak.get(proc.name, 0.0), mb)
            self.hwm[proc.name] = max(self.hwm.get(proc.name, 0.0), hwm)

    def highest(self) -> dict[str, float]:
        """Each worker's peak RSS: VmHWM, or the highest sample should that be higher."""
        return {name: max(peak, self.hwm.get(name, 0.0)) for name, peak in self.peak.items()}

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --- 8. canaries -----------------------------------------------------------------------------


def canaries(
    log_dir: Path, *, rounds: int = 3, grace_s: float = 120.0, quiet_s: float = QUIET_S
) -> Result:
    """A secret canary (the API key in the workers' environment) must appear in no Redis
    key or value and no worker log line; a prompt canary in no worker log line.

    The upstream is hostile on purpose: its error messages quote the key and the prompt,
    as real providers' sometimes do. Jobs: completions, retries, fallbacks, failures,
    invalid and hostile jobs carrying the canary, one without ``argsrepr``, one cancelled.
    """
    result = Result("canaries")
    secret = f"sk-chaos-canary-{uuid.uuid4().hex}"
    canary = f"PROMPTCANARY{uuid.uuid4().hex[:16]}"
    keyed = {"api_key_env": "CHAOS_CANARY_KEY"}
    agents = _agents(
        {"keyed": keyed, "backup": keyed, "slow": keyed},
        {
            "canary": {"model": "keyed", "fallbacks": ["backup"], "backoff": FAST_BACKOFF},
            "slow": {"model": "slow", "retries": 0},
        },
    )
    hostile = [
        {"type": "status", "code": 401, "message": f"Incorrect API key provided: {secret}"},
        {"type": "status", "code": 400, "message": f"Your prompt '{canary}' is invalid"},
        {"type": "stream_error", "after_chunks": 1, "message": f"failed near {canary} ({secret})"},
        {"type": "status", "code": 503, "message": f"overloaded reading {canary} for {secret}"},
        {"type": "reply"},
        {"type": "cut", "after_chunks": 2},
        {"type": "status", "code": 429, "message": f"slow down {secret}: {canary}"},
        {"type": "reply", "text": f"you said {canary}"},
    ]
    steps = {"keyed": hostile * (rounds * 4), "slow": [reply(100, 0.1)]}
    with Rig(
        "canaries", log_dir, agents=agents, mock_steps=steps, env={"CHAOS_CANARY_KEY": secret}
    ) as rig:
        ledger = Ledger(rig.redis, rig.prefix, rig.queue)
        prompt = [{"role": "user", "content": f"{canary} please answer"}]
        jobs: list[tuple[str, Any]] = []
        for r in range(rounds):
            jobs += [("completion", {"agent": "canary", "messages": prompt}) for _ in range(4)]
            jobs += [
                ("deadline", {"agent": "canary", "messages": prompt, "deadline_s": 0.001}),
                ("unknown agent", {"agent": canary, "messages": prompt}),
                ("bad role", {"agent": "canary", "messages": [{"role": canary, "content": "x"}]}),
                (
                    "bad content",
                    {"agent": "canary", "messages": [{"role": "user", "content": [canary]}]},
                ),
                ("bad metadata", {"agent": "canary", "messages": prompt, "metadata": canary}),
                (
                    "lone surrogate",
                    {
                        "agent": "canary",
                        "messages": [{"role": "user", "content": f"{canary} \ud800"}],
                    },
                ),
                (
                    "infinite deadline",
                    {"agent": "canary", "messages": prompt, "deadline_s": float("inf")},
                ),
                ("bad job id", {"agent": "canary", "messages": prompt, "job_id": f"{canary}/{r}"}),
            ]
        for i, (label, job) in enumerate(jobs):
            ledger.submit(job, label, f"can-{i:03d}")
        bare = f"can-bare-{uuid.uuid4().hex[:6]}"
        ledger.add(bare, "no argsrepr")
        protocol.push(
            rig.redis,
            rig.queue,
            protocol.envelope(
                protocol.body_json([{"agent": "canary", "messages": prompt}]),
                task_id=bare,
                queue=rig.queue,
                shown=None,
            ),
        )
        slow = ledger.submit({"agent": "slow", "messages": prompt}, "cancelled", "can-slow")
        if _wait_started(ledger, [slow], 30):
            pipe = rig.redis.pipeline(transaction=False)
            pipe.set(f"{rig.prefix}:cancel:{slow}", "1", ex=86_400)
            pipe.publish(f"{rig.prefix}:control", slow)
            pipe.execute()
        tally(result, rig, ledger, grace_s=grace_s, quiet_s=quiet_s)
        in_redis = _redis_holding(rig.redis, secret.encode())
        logs = dict(rig.worker_logs())
    secret_lines = _lines_holding(logs, secret)
    canary_lines = _lines_holding(logs, canary)
    result.checks += [
        Check("secret in no Redis key or value", not in_redis, _found(in_redis)),
        Check("secret in no worker log line", not secret_lines, _found(secret_lines)),
        Check("prompt canary in no worker log line", not canary_lines, _found(canary_lines)),
    ]
    result.details["secret"] = f"{secret[:16]}… in CHAOS_CANARY_KEY; prompt canary {canary}"
    return result


def _found(places: Sequence[str]) -> str:
    return f"{len(places)} found: {list(places[:3])}" if places else "none found"


def _redis_holding(client: redis.Redis, needle: bytes) -> list[str]:
    """Every key whose name or value (any type) holds ``needle``: the key, and for a
    stream the type of each event that holds it."""
    found = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        values: list[bytes] = [key]
        if kind == b"string":
            values.append(client.get(key) or b"")
        elif kind == b"hash":
            for field, value in client.hgetall(key).items():
                values += [field, value]
        elif kind == b"list":
            values += client.lrange(key, 0, -1)
        elif kind == b"set":
            values += list(client.smembers(key))
        elif kind == b"zset":
            values += [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            values += [_event_holding(fields, needle) for _id, fields in client.xrange(key)]
        where = [v.decode(errors="replace") for v in values[1:] if v.startswith(b"event ")]
        if any(needle in v for v in values) or where:
            found.append(" ".join([key.decode(errors="replace"), *where]))
    return found


def _event_holding(fields: Mapping[bytes, bytes], needle: bytes) -> bytes:
    """``event <type>`` when a replay log entry holds ``needle`` (else nothing)."""
    if not any(needle in value for value in fields.values()):
        return b""
    try:
        kind = json.loads(fields[b"e"]).get("type")
    except (KeyError, ValueError, AttributeError):
        kind = "?"
    return f"event {kind}".encode()


def _lines_holding(logs: Mapping[str, str], needle: str) -> list[str]:
    return [
        f"{name}: {line[:300]}"
        for name, text in logs.items()
        for line in text.splitlines()
        if needle in line
    ]


# --- 9. soak -----------------------------------------------------------------------------------


def soak(
    log_dir: Path,
    *,
    duration_s: float = 900.0,
    rate_per_s: float = 4.0,
    sample_every_s: float = 60.0,
    warmup_s: float = 180.0,
    ttl_s: int = 60,
    tolerance: float = 0.10,
    concurrency: int = 25,
    grace_s: float = 120.0,
    seed: int = 11,
) -> Result:
    """Steady load for ``duration_s``: streams, with some invalid jobs and some that run out
    of their deadline. Every ``sample_every_s``: worker RSS, Redis ``used_memory`` and key
    count. At the end every key of a finished job has a TTL, and neither RSS nor
    ``used_memory`` drifts more than ``tolerance`` after ``warmup_s`` (the mean of the last
    third of the samples against the first third)."""
    result = Result("soak")
    rng = random.Random(seed)
    env = {"RELIEVER_EVENT_TTL": str(ttl_s), "RELIEVER_RESULT_EXPIRES_S": str(ttl_s)}
    samples: list[dict[str, Any]] = []
    with _streams_rig(
        "soak", log_dir, n_words=20, delay_s=0.1, concurrency=concurrency, env=env
    ) as rig:
        ledger = Ledger(rig.redis, rig.prefix, rig.queue)
        began = time.monotonic()
        next_sample = began
        i = 0
        while (now := time.monotonic()) < began + duration_s:
            if now >= next_sample:
                samples.append(_soak_sample(rig, now - began))
                next_sample += sample_every_s
            roll = rng.random()
            if roll < 0.05:
                ledger.submit({"agent": "stream", "messages": "oops"}, "invalid", f"soak-{i:06d}")
            elif roll < 0.10:
                job = {**stream_job(i), "deadline_s": 0.5}
                ledger.submit(job, "deadline", f"soak-{i:06d}")
            else:
                ledger.submit(stream_job(i), "stream", f"soak-{i:06d}")
            i += 1
            if i % max(1, round(rate_per_s)) == 0:
                # Read the logs while they live: a finished job's expires after ttl_s.
                ledger.poll()
            time.sleep(max(0.0, began + i / rate_per_s - time.monotonic()))
        samples.append(_soak_sample(rig, time.monotonic() - began))
        tally(result, rig, ledger, grace_s=grace_s)
        untimed = _untimed_job_keys(rig.redis, rig.prefix, set(ledger.labels))
    result.details["samples"] = samples
    for what in ("rss_mb", "used_memory_mb", "keys"):
        result.details[f"{what} drift"] = _drift(samples, what, warmup_s)
    for what in ("rss_mb", "used_memory_mb"):
        drift = result.details[f"{what} drift"]
        result.checks.append(
            Check(
                f"{what} within {tolerance:.0%} after warm-up",
                drift is not None and drift <= tolerance,
                "too few samples" if drift is None else f"drift {drift:+.1%}",
            )
        )
    result.checks.append(
        Check(
            "every key of a finished job has a TTL",
            not untimed,
            f"{len(untimed)} without: {untimed[:8]}",
        )
    )
    return result


def _soak_sample(rig: Rig, at_s: float) -> dict[str, Any]:
    try:
        info = rig.redis.info("memory")
        used, keys = info["used_memory"] / 1e6, rig.redis.dbsize()
    except redis.RedisError:
        used, keys = None, None
    rss = {proc.name: round(rss_mb(proc.pid), 1) for proc in rig.workers.live()}
    return {
        "at_s": round(at_s),
        "rss_mb": round(sum(rss.values()), 1),
        "rss_by_worker": rss,
        "used_memory_mb": None if used is None else round(used, 2),
        "keys": keys,
    }


def _drift(samples: Sequence[Mapping[str, Any]], what: str, warmup_s: float) -> float | None:
    """The mean of the last third of the samples after ``warmup_s`` over the first third's,
    minus one (None with fewer than three such samples)."""
    values = [s[what] for s in samples if s["at_s"] >= warmup_s and s[what] is not None]
    if len(values) < 3:
        return None
    third = max(1, len(values) // 3)
    first, last = values[:third], values[-third:]
    base = sum(first) / len(first)
    return (sum(last) / len(last)) / base - 1 if base else None


def _untimed_job_keys(client: redis.Redis, prefix: str, job_ids: set[str]) -> list[str]:
    """Keys that belong to a job of ``job_ids`` (reliever's and Celery's) but have no TTL."""
    own = re.compile(rf"^(?:{re.escape(prefix)}:[a-z]+:|celery-task-meta-)(.+)$")
    untimed = []
    for key in client.scan_iter(count=1000):
        name = key.decode(errors="replace")
        match = own.match(name)
        if match and match.group(1) in job_ids and client.ttl(key) == -1:
            untimed.append(name)
    return untimed


# --- the registry ------------------------------------------------------------------------------

SCENARIOS: dict[str, Callable[..., Result]] = {
    "sigkill-loop": sigkill_loop,
    "redis-kill": lambda log_dir, **kw: redis_restart(log_dir, how="kill", **kw),
    "redis-shutdown": lambda log_dir, **kw: redis_restart(log_dir, how="shutdown", **kw),
    "client-pause": client_pause,
    "sigstop": sigstop,
    "malformed": malformed,
    "fuzz": fuzz,
    "upstream-faults": upstream_faults,
    "canaries": canaries,
    "soak": soak,
}
"""Every scenario by its name, in the order a full run takes them."""

QUICK: dict[str, dict[str, Any]] = {
    "sigkill-loop": {"jobs": 40, "for_s": 15.0, "lease_ttl_s": 3.0, "n_words": 20},
    "redis-kill": {"streams": 15, "n_words": 40},
    "redis-shutdown": {"streams": 15, "n_words": 40},
    "client-pause": {"streams": 15, "n_words": 80},
    "sigstop": {"victim_jobs": 5, "other_jobs": 5},
    "malformed": {},
    "fuzz": {"jobs": 300},
    "upstream-faults": {"jobs": 40, "huge_jobs": 2},
    "canaries": {"rounds": 1},
    "soak": {"duration_s": 180.0, "sample_every_s": 15.0, "warmup_s": 60.0, "ttl_s": 20},
}
"""``--quick``: the same scenarios, smaller (about five minutes in all)."""
