"""A TCP server on a free loopback port that speaks the Wyoming protocol wrong: what a broken
server, another program on the configured port, or a hostile one sends to the daemon. It
answers `Describe` properly (so the daemon takes it for up) unless told otherwise, and each
request with what `answer` says; it counts the bytes it got to send, which is what the
client let in."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Callable
from typing import Any

from .broker import free_port

Send = Callable[[bytes], None]

_GOOD_INFO: dict[str, Any] = {
    "asr": [
        {
            "name": "fake",
            "attribution": {"name": "test", "url": "http://localhost"},
            "installed": True,
            "description": "hostile",
            "version": "1",
            "models": [
                {
                    "name": "fake-model",
                    "attribution": {"name": "test", "url": "http://localhost"},
                    "installed": True,
                    "description": "fake",
                    "version": "1",
                    "languages": ["en"],
                }
            ],
        }
    ]
}


def event_bytes(kind: str, data: dict[str, Any] | None = None, payload: bytes = b"") -> bytes:
    """One event framed as the protocol says (header line, data, payload)."""
    header: dict[str, Any] = {"type": kind, "version": "1.5.0"}
    body = json.dumps(data).encode() if data else b""
    if body:
        header["data_length"] = len(body)
    if payload:
        header["payload_length"] = len(payload)
    return json.dumps(header).encode() + b"\n" + body + payload


GOOD_INFO = event_bytes("info", _GOOD_INFO)


def read_request(rfile: Any) -> tuple[str, int] | None:
    """Read one of the client's events; its type and payload's length, or None once it has
    closed."""
    line = rfile.readline()
    if not line:
        return None
    header = json.loads(line)
    for key in ("data_length", "payload_length"):
        if header.get(key):
            rfile.read(header[key])
    return str(header["type"]), int(header.get("payload_length") or 0)


class HostileServer:
    """`answer(send)` writes what the server says to a request (after its AudioStop unless
    `early`; `audio_bytes` is then that request's audio); `info(send)` what it says to
    Describe."""

    def __init__(
        self,
        answer: Callable[[Send], None],
        info: Callable[[Send], None] | None = None,
        early: bool = False,
        ipv6: bool = False,
    ) -> None:
        self.port = free_port()
        self.host = "::1" if ipv6 else "127.0.0.1"
        self.sent_bytes = 0
        self.requests = 0
        self.audio_bytes = 0  # the last request's audio, in bytes
        self.stopping = threading.Event()
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                def send(data: bytes) -> None:
                    self.wfile.write(data)
                    outer.sent_bytes += len(data)

                try:
                    first = read_request(self.rfile)
                    if first is not None and first[0] == "describe":
                        (info or (lambda s: s(GOOD_INFO)))(send)
                        return
                    outer.requests += 1
                    outer.audio_bytes = 0
                    while not early and (event := read_request(self.rfile)) is not None:
                        outer.audio_bytes += event[1]
                        if event[0] == "audio-stop":
                            break
                    answer(send)
                except OSError:  # the client hung up: what it should do with nonsense
                    pass

        class Server(socketserver.ThreadingTCPServer):
            address_family = socket.AF_INET6 if ipv6 else socket.AF_INET
            allow_reuse_address = True

        self._server = Server((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    def close(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()


def stream_forever(server: HostileServer, header: bytes) -> Callable[[Send], None]:
    """An answer that sends `header` then zeros as fast as the client takes them."""

    def answer(send: Send) -> None:
        send(header)
        block = bytes(1 << 16)
        while not server.stopping.is_set():
            send(block)

    return answer


def hold(server: HostileServer, first: bytes) -> Callable[[Send], None]:
    """An answer that sends `first`, then nothing more, keeping the connection open."""

    def answer(send: Send) -> None:
        send(first)
        server.stopping.wait(60)

    return answer
