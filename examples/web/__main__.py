"""``python -m examples.web [--host H] [--port P]``: serve the example web app with uvicorn.

The port is ``--port``, else ``RELIEVER_WEB_PORT``, else ``PORT`` (set by Procfile
runners), else 8000; the agent is ``RELIEVER_WEB_AGENT`` (``demo``). Exits 2, with one
line, when the app cannot start as configured (no session secret in production).
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from examples.web.app import WebSettings, create_app
from settings import Settings


def main(argv: list[str] | None = None) -> int:
    web = WebSettings()
    parser = argparse.ArgumentParser(prog="python -m examples.web", description=__doc__)
    parser.add_argument("--host", default=web.host)
    parser.add_argument("--port", type=int, default=web.port)
    args = parser.parse_args(argv)
    settings = Settings()
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(settings, web)
    except ValueError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    print(f"reliever web app on http://{args.host}:{args.port} (agent {web.agent!r})", flush=True)
    # Open event streams last as long as their jobs: give them a few seconds on shutdown.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
