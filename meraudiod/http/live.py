"""The live sockets: `/ws/events` (what MQTT publishes, as JSON) and `/ws/audio` (a client's
speech through the same listener, segmenter and worker as the microphone)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from typing import Any, Final

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from ulid import ULID

from ..audio import SAMPLE_RATE_HZ, Resampler
from ..messages import Event
from .common import HttpContext

_LOGGER = logging.getLogger(__name__)
router = APIRouter(tags=["live"])
_SUBSCRIBER_QUEUE: Final = 500  # events a slow socket may fall behind before losing some
# A message of audio is at most 1 MiB (32 s at 16 kHz; uvicorn's default was 16 MiB), and
# what waits between the socket and the listener is held in pieces to 2 MiB: 256 messages
# of any size were buffered, and a client sending faster than the VAD hears had the daemon
# hold up to 4 GiB a stream.
MAX_MESSAGE_BYTES: Final = 1 << 20
_PIECE_BYTES: Final = 32768
_STREAM_PIECES: Final = 64
_FINISH_TIMEOUT_S: Final = 300.0
MAX_LIVE_STREAMS: Final = 4
# A WebSocket is the one thing that holds a connection for long: 64 of /ws/events, the
# connection limit (http.max_connections), and every other request got 503.
MAX_EVENT_SOCKETS: Final = 16
LISTENING_OFF: Final = 4409  # the close code of a stream while listening is switched off


class EventHub:
    """Fans events out from the listener and worker threads to the sockets' event loops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = []
        self.dropped = 0

    def subscribe(self, loop: asyncio.AbstractEventLoop) -> asyncio.Queue[Any]:
        """A queue that receives every event from now on."""
        events: asyncio.Queue[Any] = asyncio.Queue(maxsize=_SUBSCRIBER_QUEUE)
        with self._lock:
            self._subscribers.append((loop, events))
        return events

    def unsubscribe(self, events: asyncio.Queue[Any]) -> None:
        """Stop delivering to this queue."""
        with self._lock:
            self._subscribers = [s for s in self._subscribers if s[1] is not events]

    def publish(self, event: Event, source: str) -> None:
        """Send an event to every socket (callable from any thread; never blocks)."""
        payload = {"topic": event.topic, **event.to_payload(), "source": source}
        with self._lock:
            subscribers = list(self._subscribers)
        for loop, events in subscribers:
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(self._put, events, payload)

    def _put(self, events: asyncio.Queue[Any], payload: dict[str, Any]) -> None:
        try:
            events.put_nowait(payload)
        except asyncio.QueueFull:
            self.dropped += 1


@router.websocket("/ws/events")
async def ws_events(websocket: WebSocket) -> None:
    """Every speech, transcript and speaker event as JSON, as MQTT publishes them."""
    ctx: HttpContext = websocket.app.state.ctx
    slots: threading.BoundedSemaphore = websocket.app.state.event_sockets
    await websocket.accept()
    if not slots.acquire(blocking=False):
        await websocket.close(1013, f"at most {MAX_EVENT_SOCKETS} event sockets at once")
        return
    try:
        await _events(websocket, ctx)
    finally:
        slots.release()


async def _events(websocket: WebSocket, ctx: HttpContext) -> None:
    events = ctx.hub.subscribe(asyncio.get_running_loop())
    receiver = asyncio.create_task(_until_closed(websocket))
    try:
        while not receiver.done():
            getter = asyncio.create_task(events.get())
            await asyncio.wait({getter, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            await websocket.send_json(getter.result())
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        receiver.cancel()
        ctx.hub.unsubscribe(events)


async def _until_closed(websocket: WebSocket) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            await websocket.receive()


class SocketStream:
    """Audio messages from a socket as the byte stream a StdinSource reads (s16le mono,
    resampled to 16 kHz when the client declared another rate)."""

    def __init__(self, rate_hz: int) -> None:
        self._chunks: queue.Queue[bytes] = queue.Queue(maxsize=_STREAM_PIECES)
        self._resampler = Resampler(rate_hz, 1) if rate_hz != SAMPLE_RATE_HZ else None
        self._ended = False
        self._odd_byte = b""  # a sample's first byte, its second in the next message

    def push(self, data: bytes) -> None:
        """One message of audio (b"" ends the stream)."""
        if not data:
            self._chunks.put(b"", timeout=30)
            return
        if self._resampler is not None:
            # Whole samples only: a message may end inside one, whose other byte comes next.
            data, self._odd_byte = self._odd_byte + data, b""
            if len(data) % 2:
                data, self._odd_byte = data[:-1], data[-1:]
            if not data:  # less than a sample: nothing the resampler can take
                return
            block = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
            data = self._resampler.process(block.reshape(-1, 1)).astype("<i2").tobytes()
        for start in range(0, len(data), _PIECE_BYTES):  # waits while the listener is behind
            self._chunks.put(data[start : start + _PIECE_BYTES], timeout=30)

    def read(self, size: int) -> bytes:
        """The next message (the reader thread blocks here); b"" for good once the stream
        ended, as a file at its end (the reader may ask again, e.g. while it looks for a WAV
        header in a stream that ended before 12 bytes)."""
        if self._ended:
            return b""
        data = self._chunks.get()
        self._ended = not data
        return data


@router.websocket("/ws/audio")
async def ws_audio(websocket: WebSocket, rate_hz: str = str(SAMPLE_RATE_HZ)) -> None:
    """Stream 16 kHz (or `?rate_hz=`) mono s16le as binary messages; speech start/end and
    transcript events come back as JSON. Send the text `end` to finish: the transcripts of
    what was said are sent, then `{"type": "done"}`, and the socket closes."""
    ctx: HttpContext = websocket.app.state.ctx
    slots: threading.BoundedSemaphore = websocket.app.state.live_streams
    await websocket.accept()
    daemon = ctx.daemon
    if daemon is None:
        await websocket.close(1011, "cannot stream here")
        return
    # Read here, not by FastAPI: its refusal of a rate that is no number came before the
    # handshake, a bare 403 a client takes for a wrong token.
    rate = int(rate_hz) if rate_hz.isdecimal() and len(rate_hz) <= 6 else 0
    if not 8000 <= rate <= 192000:
        await websocket.close(1003, f"rate_hz must be 8000 to 192000, not {rate_hz[:20]}")
        return
    if not daemon.listening:  # a live stream is a microphone: the switch closes it too
        await websocket.close(LISTENING_OFF, "listening is off: nothing is recorded until it is on")
        return
    if not slots.acquire(blocking=False):  # each stream costs a VAD and a listener thread
        await websocket.close(1013, f"at most {MAX_LIVE_STREAMS} live audio streams at once")
        return
    try:
        await _stream(websocket, ctx, daemon, rate)
    finally:
        slots.release()


async def _stream(websocket: WebSocket, ctx: HttpContext, daemon: Any, rate_hz: int) -> None:
    """One live audio stream through its own listener into the daemon's store and worker."""
    from ..sources import StdinSource

    stream = SocketStream(rate_hz)
    source = StdinSource(stream)
    source.name = f"ws:{ULID()}"
    events = ctx.hub.subscribe(asyncio.get_running_loop())
    source.start()
    # Its own listener with its own VAD (loading it is slow: off the event loop), keeping
    # the ids of what it saves (the ids of one stream: a bounded list).
    listener = await asyncio.to_thread(
        daemon.pipeline.listener, source, keep_ids=True, **daemon.speech_hooks(source.name)
    )
    _LOGGER.info("live audio %s at %d Hz", source.name, rate_hz)
    sender = asyncio.create_task(_send_own(websocket, events, source.name))
    # A client that sends nothing held a stream (a listener, a VAD) for as long as it
    # answered pings: the next message comes within http.body_timeout_s, as a body would.
    idle_s = ctx.settings.http.body_timeout_s
    try:
        while True:
            try:
                message = await asyncio.wait_for(websocket.receive(), idle_s)
            except asyncio.TimeoutError:
                said = f"no message within {idle_s:g} s (http.body_timeout_s)"
                await websocket.close(1008, said)
                break
            if message["type"] == "websocket.disconnect":
                break
            audio = message.get("bytes")
            if audio and not daemon.listening:  # `end` still ends the stream
                await websocket.close(LISTENING_OFF, "listening was switched off")
                break
            if audio and len(audio) > MAX_MESSAGE_BYTES:
                await websocket.close(1009, f"a message of {len(audio)} bytes, over 1 MiB")
                break
            if audio:
                await asyncio.to_thread(stream.push, audio)
            elif (message.get("text") or "").strip() == "end":
                await asyncio.to_thread(stream.push, b"")
                await asyncio.to_thread(listener.finished.wait, _FINISH_TIMEOUT_S)
                ids = list(listener.recording_ids or [])
                await asyncio.to_thread(_wait_jobs, ctx, ids)
                await asyncio.sleep(0.2)  # events published with the last commit arrive
                sender.cancel()
                while not events.empty():
                    await _send_if_own(websocket, events.get_nowait(), source.name)
                await websocket.send_json({"type": "done", "recording_ids": ids})
                await websocket.close()
                break
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        sender.cancel()
        ctx.hub.unsubscribe(events)
        await asyncio.to_thread(stream.push, b"")  # the listener saves what it heard and ends
        await asyncio.to_thread(listener.stop, 30.0)


async def _send_own(websocket: WebSocket, events: asyncio.Queue[Any], source: str) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            await _send_if_own(websocket, await events.get(), source)


async def _send_if_own(websocket: WebSocket, event: dict[str, Any], source: str) -> None:
    if event.get("source") == source:
        await websocket.send_json(event)


def _wait_jobs(ctx: HttpContext, rec_ids: list[str]) -> None:
    """Until the recordings' jobs are done or failed (or the timeout)."""
    if not rec_ids:
        return
    marks = ",".join("?" * len(rec_ids))
    deadline = time.monotonic() + _FINISH_TIMEOUT_S
    with ctx.connect() as conn:
        while time.monotonic() < deadline:
            open_jobs = conn.execute(
                f"SELECT COUNT(*) FROM jobs WHERE recording_id IN ({marks})"
                " AND state IN ('pending', 'running')",
                rec_ids,
            ).fetchone()[0]
            if not open_jobs:
                return
            ctx.wake_worker()
            time.sleep(0.2)
