"""Flower's configuration (``celery -A worker flower --conf=worker/flowerconfig.py``).

Basic auth comes from ``RELIEVER_FLOWER_BASIC_AUTH`` (``user:password``). Flower refuses
to start when the value is not ``user:password`` with both parts set, and, outside
development, when it is the default ``admin:admin`` (an empty value counts as the
default). In production the settings refuse the default already, so every ``celery -A
worker`` command stops there. Flower reads this file after its ``FLOWER_*`` variables,
so only command-line flags (``--basic-auth=…``) override what is set here.
"""

from __future__ import annotations

from settings import DEFAULT_FLOWER_AUTH, Settings, get_settings


def basic_auth_for(settings: Settings) -> list[str]:
    """Flower's ``basic_auth`` option for ``settings``.

    Raises:
        SystemExit: the credentials are malformed, or the default outside development.
    """
    credentials = settings.flower_basic_auth.get_secret_value()
    user, colon, password = credentials.partition(":")
    if not (user and colon and password):
        raise SystemExit(
            "reliever: RELIEVER_FLOWER_BASIC_AUTH must be user:password, both non-empty; "
            "Flower does not start without it."
        )
    if credentials == DEFAULT_FLOWER_AUTH and settings.environment != "development":
        raise SystemExit(
            f"reliever: RELIEVER_FLOWER_BASIC_AUTH is the default {DEFAULT_FLOWER_AUTH!r} "
            f"in the {settings.environment!r} environment; set your own user:password. "
            "Flower does not start with the default outside development."
        )
    return [credentials]


basic_auth = basic_auth_for(get_settings())
# Task arguments stay hidden in any case (the client sends argsrepr); keep results short.
max_tasks = 10_000
