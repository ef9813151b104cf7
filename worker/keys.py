"""Every Redis key and channel reliever uses, built from ``KEY_PREFIX`` and nowhere else.

The key space (``{p}`` is the prefix, ``reliever`` by default):

========================  ==========  ================================================
key                       type        what
========================  ==========  ================================================
``{p}:events:{job}``      channel     live events of a job (pub/sub)
``{p}:log:{job}``         stream      the same events, in order: the replay log
``{p}:seq:{job}``         string      the job's last seq (continues after redelivery)
``{p}:cooldown:{agent}``  string      the agent's pin: JSON, TTL = the cooldown
``{p}:cancel:{job}``      string      set when the job is cancelled
``{p}:control``           channel     cancellations, for the worker running the job
``{p}:lease:{job}``       string      the running worker's lease (short TTL, renewed)
``{p}:running``           hash        job id -> the job, for re-enqueueing lost jobs
``{p}:reaping:{job}``     string      a reaper is re-enqueueing the lost job (short TTL)
``{p}:result:{job}``      string      the job's result (JSON), TTL = result expiry
``{p}:deadline:{job}``    string      the job's deadline (epoch s), fixed by its first run
``{p}:dead``              list        broker messages no worker can run (worker.dead)
========================  ==========  ================================================

Pub/sub channels ignore Redis database numbers, so the prefix is what keeps two
deployments (or two tests) on one server apart.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "reliever"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def log(self, job_id: str) -> str:
        return f"{self.prefix}:log:{job_id}"

    def seq(self, job_id: str) -> str:
        return f"{self.prefix}:seq:{job_id}"

    def cooldown(self, agent: str) -> str:
        return f"{self.prefix}:cooldown:{agent}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    def control(self) -> str:
        return f"{self.prefix}:control"

    def lease(self, job_id: str) -> str:
        return f"{self.prefix}:lease:{job_id}"

    def running(self) -> str:
        return f"{self.prefix}:running"

    def result(self, job_id: str) -> str:
        return f"{self.prefix}:result:{job_id}"

    def deadline(self, job_id: str) -> str:
        return f"{self.prefix}:deadline:{job_id}"

    def dead(self) -> str:
        return f"{self.prefix}:dead"

    def reaping(self, job_id: str) -> str:
        return f"{self.prefix}:reaping:{job_id}"
