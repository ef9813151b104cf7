"""Logging setup (and, later, Sentry): what a worker process reports, and how.

Log lines carry job ids, agents, models, attempts and kinds; never message content or
keys.
"""

from __future__ import annotations

import logging

from settings import Settings


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO; the chain's own attempt lines say more, once.
    logging.getLogger("httpx").setLevel(logging.WARNING)
