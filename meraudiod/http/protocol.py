"""The HTTP stage's connection protocol: uvicorn's h11 one with the header deadline and
connection limit (timeouts.py), a malformed request answered in the API's one error shape,
and a way for a response to cut its connection short.

uvicorn answers a request line or header h11 cannot parse itself, before the app sees a
request, in plain text (`Invalid HTTP request received.`); here it is the JSON every other
error has, with h11's reason and a request id. A response that must stop half way (the audio
of a recording deleted while it downloads, http/recordings.py) can only raise, and uvicorn
then closes the connection gracefully: what the kernel still holds to send is delivered,
megabytes on a fast link. The `meraudiod.abort` extension in the request's scope resets the
connection instead (SO_LINGER 0: a RST, the unsent bytes dropped).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any, Final, cast

import h11
from ulid import ULID

from .common import BEYOND_LIMIT, error_body
from .timeouts import HeaderDeadline

ABORT: Final = "meraudiod.abort"  # scope["extensions"][ABORT]: reset this connection now
_LOGGER = logging.getLogger(__name__)
_MOST_REASON_CHARS: Final = 120


class ServerProtocol(HeaderDeadline):
    """uvicorn's h11 protocol with the header deadline, JSON 400s and the abort extension."""

    def handle_events(self) -> None:
        """uvicorn's, then the request it started (if any) is given the abort extension, and
        on a connection beyond the limit the limit (its task has not run yet: it is only
        scheduled; app.Guard answers it 503)."""
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not None and self.cycle is not cycle:
            scope = cast(dict[str, Any], self.cycle.scope)
            extensions = scope.setdefault("extensions", {})
            extensions[ABORT] = self.abort
            if self.beyond_limit:
                extensions[BEYOND_LIMIT] = self.max_connections

    def abort(self) -> None:
        """Reset the connection: nothing more reaches the client, not even what the kernel
        was still to send."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (uvicorn calls this while handling h11's error): the API's
        error shape, not uvicorn's plain text; 431 where h11 says the headers are too long."""
        error = sys.exc_info()[1]
        status = getattr(error, "error_status_hint", 400)
        reason = str(error) if isinstance(error, h11.RemoteProtocolError) else msg
        if len(reason) > _MOST_REASON_CHARS:  # h11 quotes what the client sent
            reason = reason[:_MOST_REASON_CHARS] + "..."
        request_id = str(ULID())
        if status == 431:
            body = error_body("too_large", "request headers over the limit of 16 KiB")
        else:
            status = 400
            body = error_body("bad_request", f"malformed HTTP request: {reason}")
        body["error"]["request_id"] = request_id
        # With its id, as every request's line (uvicorn's own line, dropped, had none).
        _LOGGER.warning("%s", body["error"]["message"], extra={"request_id": request_id})
        content = json.dumps(body).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode()),
            (b"x-request-id", request_id.encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=status, headers=headers),
            h11.Data(data=content),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()


def server_protocol(
    header_timeout_s: float, max_connections: int | None = None
) -> type[ServerProtocol]:
    """The protocol class for uvicorn's `http=`, with this header deadline and connection
    limit."""
    return type(
        "ServerProtocol",
        (ServerProtocol,),
        {"header_timeout_s": header_timeout_s, "max_connections": max_connections},
    )


AbortConnection = Callable[[], None]
