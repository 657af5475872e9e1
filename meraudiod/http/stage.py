"""The HTTP stage: uvicorn serving the API on a named thread inside the daemon."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any, Final

from ..checks import MayPassError, StartError
from ..config import ConfigError, Settings
from ..config_network import is_loopback
from ..stage import StageThread
from .common import HttpContext, RequestIdFilter
from .live import MAX_MESSAGE_BYTES, EventHub

_LOGGER = logging.getLogger(__name__)
_STOP_TIMEOUT_S: Final = 10.0
_GRACE_S: Final = 5  # on stopping, what requests under way are given (then cancelled)


class HttpError(MayPassError):
    """The HTTP stage cannot listen (its port may come free); the message says where.
    What only a person can fix (the extra, the token) is a StartError."""


class HttpStage(StageThread):
    """Binds its socket in start() (a port in use fails the start, before READY), then
    serves on the `http` thread until stop()."""

    thread_name = "http"

    def __init__(self, settings: Settings, daemon: Any = None) -> None:
        self.settings = settings
        self.hub = EventHub()
        self.context = HttpContext(settings, daemon, self.hub)
        self._server: Any = None
        self._socket: socket.socket | None = None

    def start(self) -> None:
        """Check the token, build the app, bind, and serve on the stage's thread."""
        http = self.settings.http
        try:
            import uvicorn

            from .app import create_app
            from .protocol import server_protocol
        except ImportError as exc:
            raise StartError(
                f"http.enabled needs the http extra: pip install 'meraudiod[http]' ({exc})"
            ) from exc
        try:
            token = http.resolved_token()
        except ConfigError as exc:
            raise StartError(str(exc)) from exc
        if token is None and not is_loopback(http.host):
            raise StartError(
                f"http.host {http.host} is reachable from other machines:"
                " set http.token or http.token_file (or bind 127.0.0.1)"
            )
        family = socket.AF_INET6 if ":" in http.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((http.host, http.port))
        except OSError as exc:
            sock.close()
            raise HttpError(f"http: cannot listen on {http.host}:{http.port}: {exc}") from exc
        sock.listen(64)
        self._socket = sock
        _clear_uploads(self.settings.storage.data_dir / "uploads")
        for handler in logging.getLogger().handlers:
            handler.addFilter(RequestIdFilter())
        logging.getLogger("uvicorn.error").addFilter(_client_errors_in_one_line)
        config = uvicorn.Config(
            create_app(self.context, token),
            log_config=None,  # the daemon's logging, not uvicorn's
            access_log=False,  # the app logs one line per request, with its id
            lifespan="off",
            ws="websockets-sansio",
            # The library holds the frame as sent: a message of 1 MiB that compresses badly
            # (permessage-deflate) is a little more, so it has room; live.py holds the
            # message itself to 1 MiB.
            ws_max_size=MAX_MESSAGE_BYTES + 64 * 1024,
            # h11 (not httptools) with a deadline for each request's headers; h11 keeps
            # its 16 KiB limit on them. The body's deadline is the app's Guard. A request
            # h11 cannot parse is answered in JSON, and a response can reset its connection.
            # The connection limit is the protocol's (uvicorn's limit_concurrency stays off).
            http=server_protocol(http.header_timeout_s, http.max_connections),
            timeout_keep_alive=5,  # an idle connection between requests
            timeout_graceful_shutdown=_GRACE_S,
        )
        self._server = uvicorn.Server(config)
        super().start()
        _LOGGER.info("http: serving on http://%s:%d", http.host, http.port)

    def _run(self) -> None:
        assert self._server is not None and self._socket is not None
        try:
            self._server.run(sockets=[self._socket])
        except BaseException:  # uvicorn exits with SystemExit on a failed start-up
            _LOGGER.exception("http server failed")
            raise

    def stop(self) -> None:
        """Finish the requests under way (up to a few seconds) and close the socket."""
        if self._server is not None:
            self._server.should_exit = True
        self.join(_STOP_TIMEOUT_S)
        if self._socket is not None:
            self._socket.close()


def _clear_uploads(folder: Path) -> None:
    """Uploads being received when the process died: only the `.part` files this stage
    writes there (a finished upload is a recording in the audio directory)."""
    for entry in folder.glob("*.part"):
        if entry.is_file():
            entry.unlink(missing_ok=True)


# What uvicorn logs with a traceback though the fault is the client's, not the daemon's.
_CLIENT_FAULTS: Final = ("Invalid UTF-8 sequence received from client.",)
_APP_FAILED: Final = "Exception in ASGI application\n"  # what uvicorn says of an exception
_UNPARSED: Final = "Invalid HTTP request received."  # a request h11 cannot parse


def _client_errors_in_one_line(record: logging.LogRecord) -> bool:
    """A client's malformed message (a WebSocket text frame that is not UTF-8, closed with
    1007), or a request still under way when the stop's grace ran out (an upload whose client
    stalled; uvicorn cancels it), is one warning line: uvicorn logged it with a traceback, as
    if the daemon had failed."""
    cancelled = record.exc_info is not None and isinstance(
        record.exc_info[1], asyncio.CancelledError
    )
    if record.msg == _UNPARSED:  # protocol.send_400_response logs it with its request id
        return False
    if record.msg in _CLIENT_FAULTS or (record.msg == _APP_FAILED and cancelled):
        if cancelled:
            record.msg = f"request cancelled on stopping: not done within {_GRACE_S} s"
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True
