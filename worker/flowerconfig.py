"""Flower's configuration (``celery -A worker flower --conf=worker/flowerconfig.py``).

Basic auth comes from ``RELIEVER_FLOWER_BASIC_AUTH`` (``user:password``); outside
development and test, settings refuse the default credentials, so Flower does not start
with them. Flower's own ``FLOWER_*`` variables still override what is set here.
"""

from __future__ import annotations

from settings import get_settings

basic_auth = [get_settings().flower_basic_auth.get_secret_value()]
# Task arguments stay hidden in any case (the client sends argsrepr); keep results short.
max_tasks = 10_000
