"""The example web app: a chat page that submits jobs and relays their events as SSE.

``python -m examples.web`` serves it (the Procfile's ``web`` line); see docs/web-app.md.
"""

from examples.web.app import WebSettings, create_app, sse_stream

__all__ = ["WebSettings", "create_app", "sse_stream"]
