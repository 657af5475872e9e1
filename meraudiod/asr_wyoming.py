"""Transcription on Wyoming speech-to-text servers (wyoming-faster-whisper, Home Assistant's
Whisper add-on): the device keeps its queue, VAD and speaker analysis; the servers only turn
audio into text.

A server returns text only, so a recording is cut at pauses into parts (with the speech
probabilities the listener's Silero VAD gave its frames, or the VAD run again when they are
gone) and each part is one request: segments keep their times, and so their
speakers. Each request has a deadline from its length, and a server that is stopped, gone or
hung costs one deadline, never a stuck worker. Servers are tried in order, or, with
strategy = spread, each request starts one server further along; one that fails is asked
again with `Describe` after 1 s, doubling to `retry_max_s`, and takes requests again once
it answers. The daemon's threads are not asyncio: each request runs its own short event
loop on the worker thread. Replies are read with bounds (`wyoming_wire`), and a transcript or
an Info with fields of the wrong type is refused like a closed connection: the server is down.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, replace
from typing import Any, Final, TypeVar

import numpy as np
from wyoming.asr import Transcribe
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.info import Describe, Info

from .asr import (
    LEAD_IN_SAMPLES,
    Segment,
    Stopped,
    Transcriber,
    Transcript,
    Unwanted,
    Wanted,
    compression_ratio,
    judge,
)
from .audio import FRAME_S, FRAME_SAMPLES, SAMPLE_RATE_HZ, Float32Array
from .config import Settings
from .segmenter import Segmenter, SegmenterParams, Utterance
from .sources import printable
from .vad import SileroVad
from .wyoming_wire import MAX_LINE_BYTES, WyomingError, read_event

_LOGGER = logging.getLogger(__name__)

_SAMPLE_WIDTH: Final = 2  # int16
_CHUNK_SAMPLES: Final = SAMPLE_RATE_HZ  # one second of audio per AudioChunk
_STOP_POLL_S: Final = 0.2  # how soon a request notices that the daemon stops
_FIRST_RETRY_S: Final = 1.0
_T = TypeVar("_T")

_MODEL_CHARS: Final = 120  # a server names its model; more is not a name
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


@dataclass
class ServerState:
    """What the device knows about one server."""

    uri: str
    up: bool | None = None  # None: not asked yet
    model: str | None = None  # from its Info
    error: str | None = None
    # The last request's error, until a request succeeds: a server that answers Describe and
    # fails every request is shown up with it, not as if nothing were wrong.
    request_error: str | None = None
    retry_s: float = _FIRST_RETRY_S
    next_try: float = 0.0  # time.monotonic() of the next Describe while down

    @property
    def address(self) -> tuple[str, int]:
        """Host and port of tcp://host:port."""
        host, port = self.uri.removeprefix("tcp://").rsplit(":", 1)
        host = host.removeprefix("[").removesuffix("]")  # an IPv6 address
        return host, int(port)


class _Client(AsyncTcpClient):
    """AsyncTcpClient that reads with bounds and can drop its connection at once (a hung
    server never answers the polite close)."""

    async def connect(self) -> None:
        """Connect with the reader's line limit set to the longest header allowed."""
        connect = asyncio.open_connection(self.host, self.port, limit=MAX_LINE_BYTES)
        self._reader, self._writer = await asyncio.wait_for(connect, self.connect_timeout)

    async def read_event(self) -> Event | None:
        """The next event, within bounds (wyoming_wire.read_event)."""
        assert self._reader is not None
        return await read_event(self._reader)

    def abort(self) -> None:
        """Reset the connection without waiting for anything."""
        if self._writer is not None:
            self._writer.transport.abort()
            self._writer = None


async def _exchange(
    server: ServerState, events: list[Event], want: str, connect_timeout_s: float
) -> Event:
    """Send events on a fresh connection and wait for the first event of type `want`."""
    host, port = server.address
    client = _Client(host, port, connect_timeout=connect_timeout_s)
    try:
        await client.connect()
        for event in events:
            await client.write_event(event)
        while True:
            answer = await client.read_event()
            if answer is None:
                raise WyomingError("closed the connection")
            if answer.type == want:
                return answer
            if answer.type == "error":  # the protocol's own: its model cannot run, say
                said = (answer.data or {}).get("text")
                raise WyomingError(f"answered with an error: {printable(str(said))[:200]}")
    finally:
        client.abort()


async def _within(work: Coroutine[Any, Any, _T], deadline_s: float, stop: threading.Event) -> _T:
    """The work's result, unless the deadline passes or the daemon stops first."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        remaining = end - loop.time()
        done, _ = await asyncio.wait({task}, timeout=max(0.0, min(_STOP_POLL_S, remaining)))
        if done:
            return task.result()
        if stop.is_set() or loop.time() >= end:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # the connection is aborted
            why = "the daemon is stopping" if stop.is_set() else f"no answer in {deadline_s:.1f} s"
            raise WyomingError(why)


def _say(exc: BaseException) -> str:
    """A short reason for the log, `status` and the job's error."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "closed the connection in the middle of a reply"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | EOFError):
        return "connection closed"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


def _model_names(event: Event) -> str:
    """The installed ASR models a server's Info names (on one line, at most 120 characters)."""
    try:
        info = Info.from_event(event)
        names = [
            str(m.name) for program in info.asr for m in program.models if m.installed is not False
        ]
    except (TypeError, AttributeError, KeyError, ValueError) as exc:  # fields of the wrong type
        raise WyomingError(f"answered Describe with an info that is not one ({exc})") from exc
    said = _CONTROL.sub(" ", ", ".join(names)).strip()
    if len(said) > _MODEL_CHARS:
        said = said[:_MODEL_CHARS] + "..."
    return said or "unknown"


def _text_and_language(event: Event) -> tuple[str, str | None]:
    """A transcript event's text and language, which must be text (or no language)."""
    text, language = event.data.get("text"), event.data.get("language")
    if not isinstance(text, str):
        raise WyomingError(f"sent a transcript whose text is {type(text).__name__}, not text")
    if language is not None and not isinstance(language, str):
        raise WyomingError(
            f"sent a transcript whose language is {type(language).__name__}, not text"
        )
    return text, language


def speech_spans(
    audio: Float32Array, vad: SileroVad, settings: Settings, trace: Float32Array | None = None
) -> list[tuple[float, float]]:
    """The recording's parts between pauses of asr.wyoming.split_silence_ms, in seconds
    (the whole recording when the VAD finds no part). `trace`: the listener's speech
    probability per frame of this audio; without one (or one that does not fit), the VAD
    runs over the audio here."""
    frames = audio.size // FRAME_SAMPLES
    if trace is None or trace.size != frames:
        vad.reset()
        trace = np.array(
            [vad(audio[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES]) for i in range(frames)],
            dtype=np.float32,
        )
    frames_per_s = 1.0 / FRAME_S
    hangover = max(1, round(settings.asr.wyoming.split_silence_ms / 1000.0 * frames_per_s))
    recorder = settings.recorder
    params = SegmenterParams(
        start_threshold=settings.vad.start_threshold,
        end_threshold=settings.vad.end_threshold,
        min_speech_frames=max(1, round(recorder.min_speech_ms / 1000.0 * frames_per_s)),
        hangover_frames=hangover,
        pre_roll_frames=round(recorder.pre_roll_ms / 1000.0 * frames_per_s),
        post_roll_frames=min(hangover, round(recorder.post_roll_ms / 1000.0 * frames_per_s)),
        max_frames=frames + 2,  # never split for length here
    )
    segmenter = Segmenter(params)
    events = []
    for prob in trace:
        events += segmenter.push(float(prob))
    events += segmenter.flush()
    duration_s = audio.size / SAMPLE_RATE_HZ
    spans = [
        (e.start_frame * FRAME_S, min(duration_s, e.end_frame * FRAME_S))
        for e in events
        if isinstance(e, Utterance)
    ]
    if spans and audio.size - (spans[-1][1] * SAMPLE_RATE_HZ) < FRAME_SAMPLES:
        spans[-1] = (spans[-1][0], duration_s)  # the last partial frame belongs to the speech
    return spans or [(0.0, duration_s)]


class WyomingTranscriber:
    """Transcripts from the Wyoming servers (the first that answers, or each in turn), else
    the local fallback."""

    def __init__(
        self,
        settings: Settings,
        vad: SileroVad,
        stop: threading.Event,
        local: Transcriber | None = None,
    ) -> None:
        self.settings = settings
        self._vad = vad  # the worker's own: its state is not shared with the listener
        self._stop = stop
        self._local = local  # asr.fallback = local; None with fallback = wait
        self._servers = [ServerState(uri) for uri in settings.asr.wyoming.servers]
        self._lock = threading.Lock()  # describe() reads from another thread
        self._last_model: str | None = None
        self._turn = 0  # strategy = spread: which of the servers that are up goes first

    # --- SpeechToText ---------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """The model that made the last transcript (a server's, or the local fallback's)."""
        known = next((s.model for s in self._servers if s.model), None)
        return self._last_model or known or "wyoming"

    def ready(self) -> bool:
        """Ask the servers that are due (Describe), and say whether a job can be done now."""
        now = time.monotonic()
        for server in self._servers:
            if server.up is not True and now >= server.next_try:
                self._probe(server)
        return self._local is not None or any(s.up for s in self._servers)

    def describe(self) -> dict[str, Any]:
        """Backend, fallback, the model in use and every server's state."""
        with self._lock:
            servers = [
                {k: v for k, v in asdict(s).items() if k in ("uri", "up", "model", "error")}
                for s in self._servers
            ]
        return {
            "backend": "wyoming",
            "fallback": self.settings.asr.fallback,
            "model": self.model_name,
            "servers": servers,
        }

    def problem(self) -> str | None:
        """Every server is down (and what happens meanwhile)."""
        if not all(s.up is False for s in self._servers):
            return None
        meanwhile = "transcribing locally" if self._local is not None else "recordings wait"
        return f"no Wyoming server answers: {meanwhile}"

    def transcribe(
        self,
        audio: Float32Array,
        vad_trace: Float32Array | None = None,
        wanted: Wanted | None = None,
    ) -> Transcript:
        """One request per part of the recording (cut where the listener's `vad_trace`, or
        the VAD run here, finds pauses); all of it locally when no server answers and the
        fallback is local, else WyomingError (the job's retry path)."""
        try:
            return self._remote(audio, vad_trace, wanted)
        except WyomingError as exc:
            if self._local is None or self._stop.is_set():  # stopping: no local work now
                raise
            _LOGGER.warning("no Wyoming server answered (%s): transcribing locally", exc)
            self._last_model = self._local.model_name
            return self._local.transcribe(audio, wanted=wanted)

    # --- requests -------------------------------------------------------------------------

    def _remote(
        self, audio: Float32Array, vad_trace: Float32Array | None, wanted: Wanted | None
    ) -> Transcript:
        asr = self.settings.asr
        duration_s = audio.size / SAMPLE_RATE_HZ
        segments: list[Segment] = []
        language = asr.language or ""
        spans = speech_spans(audio, self._vad, self.settings, vad_trace)
        for i, (start_s, end_s) in enumerate(spans):
            if i and wanted is not None and not wanted():  # a part that said nothing too
                heard = Transcript(language, duration_s, tuple(segments))
                raise Unwanted(start_s, duration_s, heard)
            part = audio[round(start_s * SAMPLE_RATE_HZ) : round(end_s * SAMPLE_RATE_HZ)]
            text, said_language, model = self._request(part)
            language = said_language or language
            self._last_model = model
            text = " ".join(text.split())
            if not text:
                continue
            segment = Segment(
                start_s=round(start_s, 3),
                end_s=round(end_s, 3),
                text=text,
                avg_logprob=None,  # a Wyoming transcript has no scores
                no_speech_prob=None,
                compression_ratio=round(compression_ratio(text), 3),
            )
            reason = judge(segment, asr)
            segments.append(segment if reason is None else replace(segment, suspect=reason))
        return Transcript(language=language, duration_s=duration_s, segments=tuple(segments))

    def _request(self, part: Float32Array) -> tuple[str, str | None, str]:
        """Text, language and model of one part, from the first server that answers."""
        w = self.settings.asr.wyoming
        # The same lead-in of silence as the local model gets (a word at sample 0 is misheard).
        padded = np.concatenate([np.zeros(LEAD_IN_SAMPLES, dtype=np.float32), part])
        pcm = (np.clip(padded, -1.0, 32767 / 32768) * 32768.0).astype("<i2").tobytes()
        fmt = {"rate": SAMPLE_RATE_HZ, "width": _SAMPLE_WIDTH, "channels": 1}
        step = _CHUNK_SAMPLES * _SAMPLE_WIDTH
        events = [
            Transcribe(language=self.settings.asr.language).event(),
            AudioStart(**fmt).event(),
            *(AudioChunk(audio=pcm[i : i + step], **fmt).event() for i in range(0, len(pcm), step)),
            AudioStop().event(),
        ]
        deadline_s = w.deadline_base_s + w.deadline_per_audio_s * padded.size / SAMPLE_RATE_HZ
        errors = []
        for server in self._in_turn():
            work = _exchange(server, events, "transcript", w.connect_timeout_s)
            try:
                event = asyncio.run(_within(work, deadline_s, self._stop))
                text, language = _text_and_language(event)
            except (OSError, EOFError, TimeoutError, ValueError, KeyError, WyomingError) as exc:
                if self._stop.is_set():  # abandoned: neither the server's fault nor the audio's
                    raise Stopped(f"{server.uri}: request abandoned on stopping") from exc
                self._down(server, exc, request=True)
                errors.append(f"{server.uri}: {server.error}")
                continue
            with self._lock:
                server.error = server.request_error = None
            return text, language, server.model or server.uri
        raise WyomingError("; ".join(errors) or "every Wyoming server is down")

    def _in_turn(self) -> list[ServerState]:
        """The servers that are up, in the order the next request tries them (one that is
        down, or never answered, is left to ready(), which asks it again in time)."""
        up = [s for s in self._servers if s.up]
        if self.settings.asr.wyoming.strategy == "spread" and up:
            first = self._turn % len(up)
            self._turn += 1
            up = up[first:] + up[:first]
        return up

    def _probe(self, server: ServerState) -> None:
        """Describe: is the server there, and which model does it run?"""
        timeout_s = self.settings.asr.wyoming.connect_timeout_s
        work = _exchange(server, [Describe().event()], "info", timeout_s)
        try:
            model = _model_names(asyncio.run(_within(work, 2 * timeout_s, self._stop)))
        except (OSError, EOFError, TimeoutError, ValueError, KeyError, WyomingError) as exc:
            self._down(server, exc)
            return
        with self._lock:
            server.up, server.error = True, server.request_error
            server.model = model
            server.retry_s = _FIRST_RETRY_S
        _LOGGER.info("Wyoming server %s is up: model %s", server.uri, server.model)

    def _down(self, server: ServerState, exc: BaseException, request: bool = False) -> None:
        """The server failed (a request's failure, `request`, is kept until one succeeds)."""
        was_up = server.up
        with self._lock:
            server.up = False
            server.error = _say(exc)
            if request:
                server.request_error = server.error
            server.next_try = time.monotonic() + server.retry_s
            server.retry_s = min(2 * server.retry_s, self.settings.asr.wyoming.retry_max_s)
        if was_up is not False:
            _LOGGER.warning("Wyoming server %s is down: %s", server.uri, server.error)
