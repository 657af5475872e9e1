"""The FastAPI application: request ids, tokens, the upload limit, one error shape, the
docs served from the device, health, metrics and the review page."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import sqlite3
import threading
import time
from http.cookies import CookieError, SimpleCookie
from importlib import resources
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, quote

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from ulid import ULID

from .. import __version__
from ..config_network import is_loopback
from ..db import no_room, refused_write
from .common import BEYOND_LIMIT, REQUEST_ID, ApiError, HttpContext, error_body

_LOGGER = logging.getLogger(__name__)
COOKIE: Final = "meraudiod_token"
_REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Without a token: liveness, and the page's shell that asks for one.
_OPEN_PATHS: Final = frozenset({"/health", "/favicon.ico"})
# A body that is not an upload (multipart/form-data): a JSON request needs a few KB, and a
# 95 MB one, under the upload limit, was parsed whole (the daemon's peak memory +190 MB).
MAX_OTHER_BODY_BYTES: Final = 1_000_000
# A request's headers. h11's 16 KiB holds only for headers that come in pieces: whole in
# one read of the socket (up to 256 KiB on loopback) they were taken.
MAX_HEADER_BYTES: Final = 16384
# The uploads stored as recordings (an enrolment's clips are not).
RECORDING_UPLOADS: Final = frozenset({"/api/v1/analysis/upload", "/api/v1/vad/upload_recording"})
# The routes that take a file (by path: a body labelled multipart elsewhere is read whole).
UPLOAD_PATHS: Final = RECORDING_UPLOADS | {"/api/v1/persistent-speakers/upload"}


class Guard:
    """ASGI middleware in front of every request and socket: request id, token, body size.

    An upload larger than the limit is refused from its Content-Length before a byte is
    read, and a chunked one as soon as it passes the limit, so it is never stored whole.
    """

    def __init__(
        self,
        app: ASGIApp,
        token: str | None,
        max_body_bytes: int,
        body_timeout_s: float,
        cors_origins: list[str] | None = None,
    ) -> None:
        self.app = app
        self.token = token
        self.cors_origins = frozenset(cors_origins or ())
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID_RE.fullmatch(given) else str(ULID())
        REQUEST_ID.set(request_id)
        t0 = time.perf_counter()
        status = [0]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                    *PAGE_HEADERS.get(scope["path"], ()),
                ]
            await send(message)

        try:
            await self._guarded(scope, receive, send_with_id, headers)
        except asyncio.CancelledError:
            # uvicorn cancels what is still under way when the daemon stops, after its grace,
            # and answered the client a plain-text 500 as if the request had failed here.
            if scope["type"] == "http" and status[0] == 0:
                # An upload's store gives up with it (uploads.store_upload); nothing else does.
                stored = "; nothing was stored" if scope["path"] in RECORDING_UPLOADS else ""
                said = f"the daemon is stopping and did not finish this request{stored}"
                await _respond(scope, receive, send_with_id, _error(503, "unavailable", said))
            raise
        finally:
            if scope["type"] == "http":
                # The path as the client encoded it: decoded, a %0A in it wrote a log line of
                # the client's own (no token needed); the filter adds the request id.
                _LOGGER.info(
                    "%s %s %d %.0f ms",
                    scope["method"],
                    quote(scope["path"]),
                    status[0],
                    (time.perf_counter() - t0) * 1000,
                )

    async def _guarded(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]
    ) -> None:
        path = scope["path"]
        limit = scope.get("extensions", {}).get(BEYOND_LIMIT)
        if limit is not None:  # uvicorn's own answer was plain text
            said = f"more than {limit} connections open (http.max_connections): try again later"
            refused = _error(503, "unavailable", said)
            refused.headers["connection"] = "close"
            await _respond(scope, receive, send, refused)
            return
        size = sum(len(k) + len(v) + 4 for k, v in scope["headers"])
        if size > MAX_HEADER_BYTES:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1009, "reason": "headers too large"})
                return
            said = f"request headers of {size} bytes, over the limit of 16 KiB"
            await _respond(scope, receive, send, _error(431, "too_large", said))
            return
        foreign = self._foreign(headers)
        if foreign is not None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 4403, "reason": "another site"})
                return
            await _respond(scope, receive, send, _error(403, "forbidden", foreign))
            return
        # The page itself may be opened from a link anywhere (a dashboard on another port).
        linked = path == "/" and scope.get("method") == "GET"
        by_cookie = self.token is not None and path not in _OPEN_PATHS and self._by_cookie(headers)
        if by_cookie and not linked and (sent_by := self._other_site(headers)) is not None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 4403, "reason": "another site"})
                return
            await _respond(scope, receive, send, _error(403, "forbidden", sent_by))
            return
        if self.token is not None and path not in _OPEN_PATHS and not self._authorized(headers):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 4401, "reason": "bad token"})
                return
            if path == "/" and scope["method"] == "GET":
                token = parse_qs(scope["query_string"].decode()).get("token", [""])[0]
                if token and _same(token, self.token):
                    await _respond(scope, receive, send, _login(token))
                    return
                await _respond(scope, receive, send, HTMLResponse(_LOGIN_PAGE, 401))
                return
            await _respond(
                scope, receive, send, _error(401, "unauthorized", "missing or wrong bearer token")
            )
            return
        if scope["type"] == "http":
            limit, message = self.max_body_bytes, too_large_message(self.max_body_bytes)
            upload = path in UPLOAD_PATHS
            if not upload and limit > MAX_OTHER_BODY_BYTES:
                limit = MAX_OTHER_BODY_BYTES
                message = too_large_message(limit, "only an upload may be larger")
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > limit:
                await _respond(scope, receive, send, _error(413, "too_large", message))
                return
            receive = self._counting(receive, limit, message)
        await self.app(scope, receive, send)

    def _foreign(self, headers: dict[str, str]) -> str | None:
        """Without a token, why a browser's request on behalf of another site is refused
        (None: it is not). A WebSocket or a form is sent cross-site whatever CORS says, and a
        site whose name resolves to 127.0.0.1 (DNS rebinding) is the same origin as this.
        With a token they carry none (the page's cookie is SameSite=Strict), and a reverse
        proxy may give another Host than the browser's Origin."""
        if self.token is not None:
            return None
        host = headers.get("host", "").lower()
        if host and not is_loopback(_host_name(host)):
            return (
                f"Host {host[:100]!r} is not this machine: without http.token the API answers"
                " its loopback names only"
            )
        origin = headers.get("origin")
        if origin is None or origin in self.cors_origins or "*" in self.cors_origins:
            return None  # "*": any origin, as the admin configured CORS
        if origin.lower().partition("://")[2] != host:
            return f"Origin {origin[:100]!r} is another site (see http.cors_origins)"
        return None

    def _other_site(self, headers: dict[str, str]) -> str | None:
        """With a token, why a request the page's cookie alone authorises is refused (None:
        it is not): a browser sent it for a page other than this one. SameSite=Strict keeps
        the cookie from other sites only, and another port of the device is the same site:
        a page there read /ws/events and switched listening off. Sec-Fetch-Site says it
        whatever Host a reverse proxy passes on; from a browser without it, the Origin."""
        origin = headers.get("origin")
        if origin is not None and (origin in self.cors_origins or "*" in self.cors_origins):
            return None
        site = headers.get("sec-fetch-site")
        if site is not None:
            if site in ("same-origin", "none"):
                return None
        elif origin is None or origin.lower().partition("://")[2] == headers.get("host", ""):
            return None
        return (
            f"Origin {(origin or '?')[:100]!r} is another page than this device's: its cookie"
            " serves its own page only (send Authorization: Bearer <token>)"
        )

    def _bearer(self, headers: dict[str, str]) -> str:
        auth = headers.get("authorization", "")
        return auth[7:].strip() if auth[:7].lower() == "bearer " else ""

    def _cookie(self, headers: dict[str, str]) -> str:
        if "cookie" not in headers:
            return ""
        cookie: SimpleCookie = SimpleCookie()
        with contextlib.suppress(CookieError):  # a malformed cookie is no token
            cookie.load(headers["cookie"])
        return cookie[COOKIE].value if COOKIE in cookie else ""

    def _by_cookie(self, headers: dict[str, str]) -> bool:
        """Authorised by the page's cookie alone (no bearer header)."""
        assert self.token is not None
        given = self._cookie(headers)
        return not self._bearer(headers) and bool(given) and _same(given, self.token)

    def _authorized(self, headers: dict[str, str]) -> bool:
        assert self.token is not None
        given = self._bearer(headers) or self._cookie(headers)
        return bool(given) and _same(given, self.token)

    def _counting(self, receive: Receive, limit: int, too_large: str) -> Receive:
        """The body, counted against the size limit and timed against its deadline: a body
        trickled a byte a second gets 408 and the connection is closed."""
        seen = [0]
        deadline = time.monotonic() + self.body_timeout_s
        complete = [False]

        async def counted() -> Message:
            if complete[0]:  # after the body: e.g. a response waiting for a disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            # asyncio's own TimeoutError until 3.11; an HTTPException passes FastAPI's body
            # parsing.
            except asyncio.TimeoutError:
                raise HTTPException(
                    408,
                    f"request body not received within {self.body_timeout_s:g} s"
                    " (http.body_timeout_s)",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                complete[0] = not message.get("more_body", False)
                if seen[0] > limit:
                    raise HTTPException(413, too_large)
            else:
                complete[0] = True
            return message

        return counted


def _host_name(host: str) -> str:
    """A Host header without its port (and an IPv6 address without its brackets)."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _same(given: str, token: str) -> bool:
    """Constant-time comparison (of any characters)."""
    return hmac.compare_digest(given.encode(), token.encode())


def too_large_message(limit_bytes: int, setting: str = "http.max_upload_mb") -> str:
    """What a refused body is told: the limit, and what sets it."""
    return f"request body over the limit of {limit_bytes / 1e6:g} MB ({setting})"


async def _respond(scope: Scope, receive: Receive, send: Send, response: Response) -> None:
    await response(scope, receive, send)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status)


def _login(token: str) -> Response:
    """The page got its token once (`/?token=...`): keep it in a cookie, drop it from the URL."""
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", max_age=365 * 86400)
    return response


# The device's pages (the review page, its login, Swagger UI and ReDoc) load nothing from
# another host: ReDoc's bundle asked cdn.redoc.ly for its logo, telling that host that a
# device was being looked at. No other site may frame them: the page in another site's
# frame, invisible over that site's buttons, would take the user's clicks (delete, opt out,
# the listening switch): clickjacking. The review page runs no script but its own file (a
# name injected into it runs nothing); the docs' pages need their inline start-up script.
_NO_FRAMES: Final = (b"x-frame-options", b"DENY")
_PAGE_POLICY: Final = (
    b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
_DOCS_POLICY: Final = (
    b"default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline';"
    b" img-src 'self' data:; worker-src 'self' blob:; frame-ancestors 'none'"
)
PAGE_HEADERS: Final = {
    "/": [_NO_FRAMES, (b"content-security-policy", _PAGE_POLICY)],
    "/api/docs": [_NO_FRAMES, (b"content-security-policy", _DOCS_POLICY)],
    "/api/redoc": [_NO_FRAMES, (b"content-security-policy", _DOCS_POLICY)],
}

_LOGIN_PAGE: Final = """<!doctype html><meta name="viewport" content="width=device-width">
<title>meraudiod</title><form method="get" action="/"><p>This device needs its token
(<code>http.token</code>).</p><input name="token" type="password" autofocus>
<button>Open</button></form>"""


def create_app(ctx: HttpContext, token: str | None) -> FastAPI:
    """The application, with every route, bound to a context."""
    from fastapi_offline import FastAPIOffline

    from . import live, recordings, speakers, uploads
    from .metrics import metrics_registry, metrics_response

    app = FastAPIOffline(
        title="meraudiod",
        version=__version__,
        description="Recordings, transcripts, voices and live audio of this device.",
        docs_url="/api/docs",
        redoc_url="/api/redoc",
        openapi_url="/api/openapi.json",
        static_url="/api/static-docs",
        # Swagger UI sent the spec's URL to validator.swagger.io for a badge when the page
        # was opened by any name but localhost.
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.ctx = ctx
    app.state.live_streams = threading.BoundedSemaphore(live.MAX_LIVE_STREAMS)
    app.state.event_sockets = threading.BoundedSemaphore(live.MAX_EVENT_SOCKETS)
    app.state.decoding = asyncio.Semaphore(uploads.DECODING_AT_ONCE)
    app.add_middleware(
        Guard,
        token=token,
        max_body_bytes=int(ctx.settings.http.max_upload_mb * 1e6),
        body_timeout_s=ctx.settings.http.body_timeout_s,
        cors_origins=ctx.settings.http.cors_origins,
    )
    # Outside the guard: a browser's preflight carries no token.
    cors = ctx.settings.http.cors_origins
    if cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors,
            allow_methods=["*"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    _error_handlers(app)
    # The guard checks the token; this only tells the docs (and their Authorize button).
    bearer = [Depends(HTTPBearer(auto_error=False, description="http.token"))] if token else []
    for module in (recordings, speakers, uploads, live):
        app.include_router(module.router, dependencies=bearer)

    @app.get("/health", tags=["health"])
    def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/health/ready", tags=["health"])
    def ready() -> JSONResponse:
        """Readiness: models loaded, database writable, microphone, MQTT."""
        from .metrics import readiness

        checks = readiness(ctx)
        ok = all(c["ok"] for c in checks.values())
        return JSONResponse(
            {"status": "ready" if ok else "not_ready", "checks": checks}, 200 if ok else 503
        )

    registry = metrics_registry(ctx)

    @app.get("/metrics", tags=["health"], response_class=Response)
    def metrics() -> Response:
        """Prometheus text format: frames, recordings, backlog, latency, RTF, outbox."""
        return metrics_response(registry)

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(_asset("index.html"))

    @app.get("/page/{name}", include_in_schema=False)
    def page_asset(name: str) -> Response:
        types = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in types:
            raise ApiError(404, "not_found", f"no page asset {name[:40]!r}")
        return Response(_asset(name), media_type=types[name])

    return app


_UNPARSED: Final = "There was an error parsing the body"  # FastAPI's HTTPException detail


def _problem(error: Any) -> str:
    """One validation error: where, and what is wrong (for a body that is not JSON, the
    parser's reason and its position, where FastAPI says `body.<position>: JSON decode
    error`)."""
    if error["type"] == "json_invalid":
        where = error["loc"][-1]
        return f"body: not valid JSON at character {where}: {error['ctx']['error']}"
    return f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"


def _asset(name: str) -> str:
    return (resources.files("meraudiod.http") / "page" / name).read_text(encoding="utf-8")


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        response = _error(exc.status, exc.code, exc.message)
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == _UNPARSED and exc.__cause__ is not None:
            # FastAPI's words for JSON Python will not read (nested too deep, a number of
            # thousands of digits), which hide why
            why = str(exc.__cause__).split(";")[0]  # not Python's advice on its own limits
            return _error(422, "invalid_request", f"body: not valid JSON: {why}")
        codes = {
            400: "bad_request",
            404: "not_found",
            405: "method_not_allowed",
            408: "timeout",
            413: "too_large",
        }
        response = _error(
            exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail)
        )
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(_problem(e) for e in exc.errors())
        return _error(422, "invalid_request", problems)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        _LOGGER.error("request failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        return _error(500, "internal", f"internal error: {type(exc).__name__}")

    @app.exception_handler(OSError)
    @app.exception_handler(sqlite3.Error)
    async def storage_error(request: Request, exc: Exception) -> JSONResponse:
        if not refused_write(exc):  # the storage refused it: room, a remount, an admin mend that
            return await internal(request, exc)
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        if no_room(exc):
            said = f"disk full: {why}"
        elif isinstance(exc, OSError) and exc.filename is not None:
            said = f"cannot write {Path(str(exc.filename)).parent}: {why}"
        else:
            said = f"cannot write the database: {why}"
        _LOGGER.error("request failed, nothing stored: %s", said)  # one line, no traceback
        return _error(507, "insufficient_storage", f"{said}; nothing was stored")
