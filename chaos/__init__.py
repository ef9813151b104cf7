"""reliever's chaos suite: ``python -m chaos`` (see ``python -m chaos --help``).

It checks the delivery promise under faults: at-least-once delivery, exactly one terminal
event (``completed`` or ``failed``) per job, and seq 1, 2, 3 … without a gap in each job's
replay log. Every scenario starts its own processes (a Redis server on a port of its own,
the mock upstream, two workers from the Procfile's line), submits jobs by the documented
wire protocol (docs/protocol.md), injects its faults, reads every job's replay log back,
and stops everything it started. docs/reliability.md describes the scenarios and their
pass criteria, with the results of a full run.

Modules:

* ``rig``: the processes (Redis server, mock upstream, supervised workers).
* ``protocol``: Celery messages as kombu's Redis transport stores them; replay log keys.
* ``ledger``: the jobs of a scenario, their replay logs judged against the promise.
* ``result``: a scenario's counts, checks and evidence (worker exits, log lines).
* ``scenarios``: the scenarios and their parameters.
* ``malformed``: the malformed-message catalogue.
* ``fuzz``: the seeded generator of hostile jobs.
* ``report``: the markdown report.
"""
