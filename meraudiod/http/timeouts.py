"""The deadline for a request's headers, which uvicorn lacks (and its connection limit,
held per connection).

uvicorn's only timer on a connection is the keep-alive one, started after a response and
reset by every byte received: a client that connects and sends nothing, or trickles its
headers a byte at a time (slowloris), held its connection for ever. Here a connection that
has not sent a complete request line and headers `header_timeout_s` after it began waiting
for them is closed. The body's deadline is the Guard's (`app.py`), which can answer 408.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_LOGGER = logging.getLogger(__name__)


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are late."""

    header_timeout_s = 10.0  # set per server by with_header_deadline()
    max_connections: int | None = None  # likewise
    beyond_limit = False  # this connection came when max_connections were open

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """A new connection waits for its first request's headers; one beyond
        `max_connections` is marked so (`beyond_limit`): its requests are answered 503
        (protocol.py). uvicorn's own limit_concurrency is left off: checked at each request
        against every open connection, once more were open every request on any of them got
        503 (a burst of 100 served none), in plain text."""
        super().connection_made(transport)
        self.beyond_limit = (
            self.max_connections is not None and len(self.connections) > self.max_connections
        )
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        """Bytes arrived: the deadline stays (a byte is no progress) until headers are whole."""
        super().data_received(data)
        self._watch_headers()

    def on_response_complete(self) -> None:
        """The next request on this connection has its own deadline."""
        super().on_response_complete()
        self._watch_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        """Nothing left to time."""
        self._cancel()
        super().connection_lost(exc)

    def _watch_headers(self) -> None:
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if not waiting:
            self._cancel()
        elif self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._late)

    def _cancel(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            peer = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
            _LOGGER.info(
                "http: closed %s: no complete request headers within %g s (http.header_timeout_s)",
                peer,
                self.header_timeout_s,
            )
            self.transport.close()
