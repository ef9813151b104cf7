"""The example web app (Starlette): submit a chat job, relay its events as SSE, cancel it.

Routes:

- ``GET /``: the chat page (``index.html``; its script and style are ``/static/app.js``
  and ``/static/app.css``, plain JavaScript with ``EventSource``).
- ``POST /chat`` ``{"prompt": "..."}``: submits a job to the configured agent and answers
  ``202 {"job_id", "events"}``.
- ``GET /chat/{job_id}/events``: the job's events as Server-Sent Events, read from its
  replay log (``XREAD`` on ``{prefix}:log:{job}`` with redis.asyncio, so a waiting browser
  holds no thread). Each event is sent as ``id: <seq>`` plus ``data: <event JSON>``. A
  reconnecting ``EventSource`` sends ``Last-Event-ID``; events with ``seq`` up to it are
  skipped. ``?last_event_id=`` does the same for a page that restores itself after a
  reload (``EventSource`` cannot set headers). The stream ends after the terminal event;
  a request whose ``Last-Event-ID`` is already the terminal event gets ``204``, which tells
  ``EventSource`` to stop reconnecting.
- ``POST /chat/{job_id}/cancel``: cancels the job (``202``); it ends ``failed``/``cancelled``.
- ``GET /healthz``: ``ok``.

Submitting and cancelling use the synchronous :class:`worker.client.Client` in Starlette's
thread pool; only the relay, which lives as long as a job, is asyncio.

Every response carries :data:`SECURITY_HEADERS` (a Content-Security-Policy that allows the
app's own files only, no framing, no MIME sniffing, no referrer). Every ``POST`` must be
``application/json`` (else 415) and come from the page's own origin (else 403): see
:func:`refusal`. A job's events and cancel belong to the browser session that submitted
it (a signed cookie, :class:`Sessions`); any other request for them gets 404. Submitting
is limited per session and per client address (:func:`_over_limit`): over it, 429 with
``Retry-After``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import logging
import math
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import redis
import redis.asyncio as aredis
from kombu.exceptions import OperationalError
from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from settings import Settings
from worker.client import Client
from worker.errors import JobError
from worker.events import TERMINAL_TYPES
from worker.jobs import is_job_id
from worker.keys import Keys

log = logging.getLogger("reliever.web")

PAGE = Path(__file__).with_name("index.html")
STATIC = Path(__file__).with_name("static")
_ORIGIN = re.compile(r"https?://[^/?#\s]+")
SESSION_COOKIE = "reliever_session"
_BLOCK_MS = 5000
_BATCH = 500

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# Sec-Fetch-Site values a POST may carry: the page itself, or the user (typed, bookmarked).
_OWN_FETCH_SITES = ("same-origin", "none")


class WebSettings(BaseSettings):
    """The web app's own settings (``RELIEVER_WEB_*``); reliever's come from ``Settings``."""

    model_config = SettingsConfigDict(
        env_prefix="RELIEVER_WEB_", env_file=".env", env_ignore_empty=True, extra="ignore"
    )

    agent: str = "demo"
    host: str = "127.0.0.1"
    port: int = Field(8000, validation_alias=AliasChoices("RELIEVER_WEB_PORT", "PORT"))
    max_prompt_chars: int = Field(20_000, gt=0)
    stream_idle_s: float = Field(
        600.0, gt=0, description="end a stream after this long without events (it reconnects)"
    )
    session_secret: SecretStr | None = Field(
        None,
        min_length=32,
        description="signs session cookies; unset = a random one per process (not in production)",
    )
    jobs_per_session: int = Field(10, gt=0, description="jobs a session may submit per window")
    jobs_per_ip: int = Field(30, gt=0, description="jobs a client address may submit per window")
    rate_window_s: int = Field(60, gt=0, description="the rate limits' fixed window")
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="origins the page is served from (comma-separated); unset = the request's Host",
    )

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for part in re.split(r"[\s,]+", value) if part]
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        normal = [origin.rstrip("/").lower() for origin in origins]
        for origin in normal:
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r}: expected an origin, scheme://host[:port]")
        return normal


class Sessions:
    """Browser sessions: a random id in an ``HttpOnly``, ``SameSite=Strict`` cookie, signed
    with HMAC-SHA256 so that no one can make up a session or take another's id."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _signature(self, session_id: str) -> bytes:
        digest = hmac.new(self._secret, session_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=")

    def new(self) -> tuple[str, str]:
        """A new session: its id, and the cookie value that carries it."""
        session_id = secrets.token_urlsafe(18)
        return session_id, f"{session_id}.{self._signature(session_id).decode()}"

    def session_id(self, request: Request) -> str | None:
        """The session the request's cookie carries; None without one or with a forged one."""
        session_id, dot, signature = request.cookies.get(SESSION_COOKIE, "").partition(".")
        if not dot or not hmac.compare_digest(signature.encode(), self._signature(session_id)):
            return None
        return session_id

    def set_cookie(self, request: Request, response: Response, cookie: str) -> None:
        """Give the browser its session; ``Secure`` when the request came over HTTPS."""
        response.set_cookie(
            SESSION_COOKIE,
            cookie,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )


def _session_secret(settings: Settings, web: WebSettings) -> bytes:
    """``RELIEVER_WEB_SESSION_SECRET``; unset, a random one, except in production.

    Raises:
        ValueError: unset in production, where every instance must sign alike.
    """
    if web.session_secret is not None:
        return web.session_secret.get_secret_value().encode()
    if settings.environment == "production":
        raise ValueError("RELIEVER_WEB_SESSION_SECRET must be set in production (32+ characters)")
    log.warning("RELIEVER_WEB_SESSION_SECRET is unset: sessions end when this process exits")
    return secrets.token_bytes(32)


async def _over_limit(
    client: aredis.Redis, limits: Sequence[tuple[str, int]], window_s: int
) -> int:
    """Count one job against each ``(key, limit)``; seconds until it may be retried, or 0.

    Each key counts in a fixed window of ``window_s`` that starts with its first job (the
    key's TTL), in one transaction. A refused job counts too, but never lengthens a window.
    """
    async with client.pipeline(transaction=True) as pipe:
        for key, _limit in limits:
            pipe.set(key, 0, ex=window_s, nx=True)
            pipe.incr(key)
            pipe.pttl(key)
        replies = await pipe.execute()
    counts, ttls_ms = replies[1::3], replies[2::3]
    waits_ms = [
        ttl_ms
        for (_key, limit), count, ttl_ms in zip(limits, counts, ttls_ms, strict=True)
        if count > limit
    ]
    return math.ceil(max(waits_ms) / 1000) if waits_ms else 0


def _last_seq(request: Request) -> int:
    """Where the reader is: ``Last-Event-ID``, else ``?last_event_id=``, else 0.

    Raises:
        ValueError: the value is not a non-negative integer.
    """
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if not raw:
        return 0
    seq = int(raw)
    if seq < 0:
        raise ValueError(raw)
    return seq


def _sse(seq: int, data: str) -> str:
    # Event JSON is one line (json.dumps escapes newlines), so one data: field suffices.
    return f"id: {seq}\ndata: {data}\n\n"


async def sse_stream(
    client: aredis.Redis,
    stream: str,
    after_seq: int,
    *,
    block_ms: int = _BLOCK_MS,
    idle_s: float = 600.0,
) -> AsyncIterator[str]:
    """SSE text for every event in ``stream`` with ``seq > after_seq``, to the terminal one.

    Reads the replay log from its start (``0-0``), so a reader that comes late, or comes
    back, gets everything it has not seen, once and in order. A comment line goes out
    whenever ``block_ms`` pass without an event (proxies keep the connection open); after
    ``idle_s`` without an event the stream ends and the browser reconnects.
    """
    yield "retry: 1000\n\n"
    last_id: Any = "0-0"
    quiet_since = time.monotonic()
    while True:
        reply: Any = await client.xread({stream: last_id}, count=_BATCH, block=block_ms)
        if not reply:
            if time.monotonic() - quiet_since >= idle_s:
                return
            yield ": keep-alive\n\n"
            continue
        quiet_since = time.monotonic()
        for _name, entries in reply:
            for entry_id, fields in entries:
                last_id = entry_id
                seq = int(fields[b"s"])
                data = fields[b"e"].decode()
                terminal = json.loads(data)["type"] in TERMINAL_TYPES
                if seq > after_seq:
                    yield _sse(seq, data)
                if terminal:
                    return


async def _already_ended(client: aredis.Redis, stream: str, after_seq: int) -> bool:
    """True when the reader has the job's terminal event already."""
    newest: Any = await client.xrevrange(stream, count=1)
    if not newest:
        return False
    _entry_id, fields = newest[0]
    event = json.loads(fields[b"e"])
    return event["type"] in TERMINAL_TYPES and int(fields[b"s"]) <= after_seq


def refusal(request: Request, allowed_origins: Sequence[str]) -> Response | None:
    """The answer to a ``POST`` that must not go on, or None when it may.

    403 when it comes from another origin: ``Origin``, when sent, must be one of
    ``allowed_origins`` (unset: the origin the request's ``Host`` names), and
    ``Sec-Fetch-Site``, when sent, must say the page itself (or the user) sent it. A request
    with neither header comes from a program, not a browser: browsers send ``Origin`` on
    every ``POST``. 415 unless the body is ``application/json``, which no page can send to
    another origin without a CORS preflight, and this app answers no preflight.
    """
    own = allowed_origins or [f"{request.url.scheme}://{request.headers.get('host', '')}".lower()]
    origin = request.headers.get("origin")
    site = request.headers.get("sec-fetch-site")
    if (origin is not None and origin not in own) or (
        site is not None and site not in _OWN_FETCH_SITES
    ):
        return JSONResponse({"error": "requests from other origins are refused"}, status_code=403)
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        return JSONResponse({"error": "expected Content-Type: application/json"}, status_code=415)
    return None


class Protect:
    """ASGI middleware around the whole app: :data:`SECURITY_HEADERS` on every response,
    and :func:`refusal` for every ``POST``.

    It wraps Starlette itself rather than sitting in its middleware list, so the 500s of
    Starlette's outermost error handler get the headers too.
    """

    def __init__(self, app: ASGIApp, allowed_origins: Sequence[str]) -> None:
        self.app = app
        self.allowed_origins = allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        refused = (
            refusal(Request(scope), self.allowed_origins) if scope["method"] == "POST" else None
        )
        if refused is not None:
            await refused(scope, receive, send_with_headers)
        else:
            await self.app(scope, receive, send_with_headers)


def create_app(settings: Settings | None = None, web: WebSettings | None = None) -> ASGIApp:
    """The ASGI app: Starlette inside :class:`Protect`.

    ``settings`` and ``web`` default to the ones read from the environment.

    Raises:
        ValueError: no ``RELIEVER_WEB_SESSION_SECRET`` in production.
    """
    settings = settings or Settings()
    web = web or WebSettings()
    keys = Keys(settings.key_prefix)
    sessions = Sessions(_session_secret(settings, web))
    page = PAGE.read_text(encoding="utf-8").replace("__AGENT__", html.escape(web.agent))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.client = Client(settings=settings)
        app.state.redis = aredis.Redis.from_url(settings.redis_url)
        try:
            yield
        finally:
            await app.state.redis.aclose()
            app.state.client.close()

    def owner_key(job_id: str) -> str:
        return f"{settings.key_prefix}:web:owner:{job_id}"

    def rate_key(kind: str, who: str) -> str:
        return f"{settings.key_prefix}:web:rate:{kind}:{who}"

    async def owned(request: Request, job_id: str) -> bool:
        """True when the request's session submitted the job."""
        session_id = sessions.session_id(request)
        if session_id is None:
            return False
        owner = await request.app.state.redis.get(owner_key(job_id))
        return owner is not None and hmac.compare_digest(owner, session_id.encode())

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def chat(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "expected a JSON body"}, status_code=400)
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            return JSONResponse({"error": "prompt: a non-empty string"}, status_code=400)
        if len(prompt) > web.max_prompt_chars:
            limit = web.max_prompt_chars
            return JSONResponse({"error": f"prompt: over {limit} characters"}, status_code=413)
        session_id = sessions.session_id(request)
        cookie = None
        if session_id is None:
            session_id, cookie = sessions.new()
        address = request.client.host if request.client else "unknown"
        limits = [
            (rate_key("session", session_id), web.jobs_per_session),
            (rate_key("ip", address), web.jobs_per_ip),
        ]
        client: Client = request.app.state.client
        job_id = str(uuid.uuid4())
        try:
            retry_after = await _over_limit(request.app.state.redis, limits, web.rate_window_s)
            if retry_after:
                return JSONResponse(
                    {"error": "too many jobs: try again later"},
                    status_code=429,
                    headers={"Retry-After": str(retry_after)},
                )
            # The owner goes first, so no moment exists when the job is anyone's; when the
            # submit then fails, the key names a job that never was, until it expires.
            await request.app.state.redis.set(owner_key(job_id), session_id, ex=settings.event_ttl)
            job = await run_in_threadpool(
                client.submit, web.agent, [{"role": "user", "content": prompt}], job_id=job_id
            )
        except JobError as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        except (redis.RedisError, OperationalError):
            log.exception("submitting a job failed")
            return JSONResponse({"error": "reliever is unavailable"}, status_code=503)
        log.info("submitted job %s to agent %s", job.job_id, web.agent)
        response = JSONResponse(
            {"job_id": job.job_id, "events": f"/chat/{job.job_id}/events"}, status_code=202
        )
        if cookie is not None:
            sessions.set_cookie(request, response, cookie)
        return response

    async def events(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if not is_job_id(job_id) or not await owned(request, job_id):
            return JSONResponse({"error": "unknown job id"}, status_code=404)
        try:
            after_seq = _last_seq(request)
        except ValueError:
            return JSONResponse({"error": "Last-Event-ID: expected a seq"}, status_code=400)
        client: aredis.Redis = request.app.state.redis
        stream = keys.log(job_id)
        if after_seq and await _already_ended(client, stream, after_seq):
            return Response(status_code=204)
        return StreamingResponse(
            sse_stream(client, stream, after_seq, idle_s=web.stream_idle_s),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def cancel(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if not is_job_id(job_id):
            return JSONResponse({"error": "unknown job id"}, status_code=404)
        client: Client = request.app.state.client
        try:
            if not await owned(request, job_id):
                return JSONResponse({"error": "unknown job id"}, status_code=404)
            await run_in_threadpool(client.cancel, job_id)
        except redis.RedisError:
            log.exception("cancelling job %s failed", job_id)
            return JSONResponse({"error": "reliever is unavailable"}, status_code=503)
        log.info("cancel requested for job %s", job_id)
        return JSONResponse({"job_id": job_id, "cancel": "requested"}, status_code=202)

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/healthz", health),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
            Route("/chat", chat, methods=["POST"]),
            Route("/chat/{job_id}/events", events),
            Route("/chat/{job_id}/cancel", cancel, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    return Protect(app, web.allowed_origins)
