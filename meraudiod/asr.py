"""faster-whisper wrapper: 16 kHz float32 audio in, our Transcript out; a hallucination guard.

`SpeechToText` is the one interface the worker uses: `Transcriber` here, or the Wyoming
servers' client in asr_wyoming.py.
"""

from __future__ import annotations

import logging
import re
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Protocol

from .audio import SAMPLE_RATE_HZ, Float32Array
from .config_sections import AsrSettings
from .memory import defer_pyav, encoder_heap, release_memory, transcription_heap
from .onnx import load_error
from .whisper_features import chunked_feature_extractor
from .whisper_tokenizer import WhisperTokenizer
from .whisper_tokenizer import install as install_tokenizer

_LOGGER = logging.getLogger(__name__)

# Phrases Whisper is known to invent on silence and noise (subtitles in its training data).
_PHANTOM_PHRASES: Final = (
    "thanks for watching",
    "thank you for watching",
    "thank you so much for watching",
    "please subscribe",
    "like and subscribe",
    "subscribe to my channel",
    "see you in the next video",
    "see you next time",
    "subtitles by",
    "captions by",
    "transcribed by",
    "amara.org",
    "thank you",
    "you",
    "bye",
    "i'm sorry",
)


_MAX_COMPRESSION_RATIO: Final = 2.4
LEAD_IN_S: Final = 0.25
LEAD_IN_SAMPLES: Final = int(LEAD_IN_S * SAMPLE_RATE_HZ)
_FALLBACK_TEMPERATURES: Final = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
# Whisper decodes 30 s at a time. Audio longer than that (an upload: the listener's recordings
# end by 28 s) is given up between segments when the daemon stops: finished, a 30-minute
# upload held the stop for minutes, past the unit's TimeoutStopSec, and systemd's SIGKILL
# counted a crash against it each time.
WHISPER_WINDOW_S: Final = 30.0
# Whisper writes these for sounds that are not speech.
_SOUND_LABELS: Final = frozenset(
    {
        # Whisper's labels for sounds, and fillers that alone say nothing
        *("music", "mmm", "mm", "hmm", "applause", "laughter", "laughs", "silence", "noise"),
        *("beep", "static", "wind", "inaudible", "sigh", "sighs", "humming"),
        *("oh", "uh", "um", "ah", "hm", "huh"),
    }
)
# Real short commands measured down to about -1.2; non-speech that slips past the VAD
# was seen at -1.5 and below.
_VERY_LOW_MARGIN: Final = 0.5


Wanted = Callable[[], bool]  # is the recording being transcribed still wanted?


class AsrError(Exception):
    """The model could not be loaded or the audio could not be transcribed."""


class Stopped(AsrError):
    """A long recording's transcription was given up part way, the daemon stopping or the
    room's recordings going first (worker._heard): its job goes back as it was, no attempt
    counted."""


class Unwanted(AsrError):
    """A long transcription given up part way because `wanted` said no (the recording was
    deleted, or the room's recordings go first): what was heard up to `done_s`, from where
    a transcription of the rest takes up."""

    def __init__(self, done_s: float, duration_s: float, heard: Transcript) -> None:
        super().__init__(f"given up {done_s:.0f} s into {duration_s:.0f} s")
        self.done_s = done_s
        self.heard = heard


class ServerError(AsrError):
    """A transcription server failed; the message says which and how, so a traceback (of the
    daemon's own code) would add nothing to the log."""


@dataclass(frozen=True)
class Word:
    """One word with its time (seconds from the start of the audio)."""

    start_s: float
    end_s: float
    text: str
    probability: float


@dataclass(frozen=True)
class Segment:
    """One Whisper segment with the scores the guard looks at (None: not known, because a
    Wyoming server returns text only)."""

    start_s: float
    end_s: float
    text: str
    avg_logprob: float | None
    no_speech_prob: float | None
    compression_ratio: float
    words: tuple[Word, ...] = ()
    suspect: str | None = None  # why it is not trusted as speech


@dataclass(frozen=True)
class Transcript:
    """What Whisper heard in one recording."""

    language: str
    duration_s: float
    segments: tuple[Segment, ...] = field(default_factory=tuple)

    @property
    def text(self) -> str:
        """The trusted text (suspect segments left out)."""
        return " ".join(s.text for s in self.segments if not s.suspect).strip()

    @property
    def suspect(self) -> bool:
        """Nothing in it is trusted as speech."""
        return all(s.suspect for s in self.segments)


def later(transcript: Transcript, by_s: float, earlier: Transcript | None) -> Transcript:
    """The transcript of audio that starts by_s into a recording, as times of the whole
    recording, after what was heard of it before (`earlier`, None: nothing)."""
    moved = tuple(
        replace(
            s,
            start_s=round(s.start_s + by_s, 3),
            end_s=round(s.end_s + by_s, 3),
            words=tuple(
                replace(w, start_s=round(w.start_s + by_s, 3), end_s=round(w.end_s + by_s, 3))
                for w in s.words
            ),
        )
        for s in transcript.segments
    )
    language = earlier.language if earlier is not None else transcript.language
    before = earlier.segments if earlier is not None else ()
    return Transcript(language, round(transcript.duration_s + by_s, 3), before + moved)


class SpeechToText(Protocol):
    """What the worker transcribes with: Whisper on this device, or Wyoming servers."""

    @property
    def model_name(self) -> str:
        """The model that made the last transcript (stored with it, named in events)."""
        ...

    def transcribe(
        self,
        audio: Float32Array,
        vad_trace: Float32Array | None = None,
        wanted: Wanted | None = None,
    ) -> Transcript:
        """Transcribe one recording of 16 kHz float32 audio; raises AsrError. `vad_trace`:
        the listener's speech probability for each of its frames, when known. `wanted`:
        asked between the parts of a long recording; False gives it up (Unwanted)."""
        ...

    def ready(self) -> bool:
        """Whether a job may be claimed now (False: every server is down, and we wait)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Backend, model and servers, for `status` and `state`."""
        ...

    def problem(self) -> str | None:
        """What is wrong, for `degraded` (None when all is well)."""
        ...


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).strip()


def compression_ratio(text: str) -> float:
    """Whisper's repetition measure: the text's length over its zlib-compressed length."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def judge(segment: Segment, settings: AsrSettings) -> str | None:
    """Why a segment should not be trusted as speech, or None."""
    if not segment.text.strip():
        return "empty"
    logprob, no_speech_prob = segment.avg_logprob, segment.no_speech_prob
    # Without scores (a Wyoming server), nothing can vouch for a phantom phrase.
    unscored = logprob is None or no_speech_prob is None
    no_speech = no_speech_prob is not None and no_speech_prob > settings.no_speech_threshold
    low_logprob = logprob is not None and logprob < settings.logprob_threshold
    if no_speech and low_logprob:  # Whisper's own rule for "nothing was said"
        return "no_speech"
    words = " ".join(_normalise(segment.text).split())
    if set(words.split()) <= _SOUND_LABELS:  # "Music", "Mmm...", "(beep beep)", "..."
        return "sound_label"
    if logprob is not None and logprob < settings.logprob_threshold - _VERY_LOW_MARGIN:
        return "low_confidence"
    phantom = words in _PHANTOM_PHRASES or any(p in words for p in _PHANTOM_PHRASES if len(p) > 8)
    if phantom and (no_speech or low_logprob or unscored):
        return "phantom_phrase"
    if segment.compression_ratio > _MAX_COMPRESSION_RATIO:  # loops like "the the the the"
        return "repetitive"
    return None


def _whisper_model_class() -> Any:
    """faster-whisper's WhisperModel with its encoder's buffers mmapped (memory.py) and its
    features of long audio computed a block at a time (whisper_features.py)."""
    from faster_whisper import WhisperModel

    class _WhisperModel(WhisperModel):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.feature_extractor = chunked_feature_extractor(LEAD_IN_SAMPLES, **self.feat_kwargs)

        def encode(self, features: Any) -> Any:
            with encoder_heap():
                return super().encode(features)

    return _WhisperModel


class Transcriber:
    """A faster-whisper model loaded once, with our settings."""

    def __init__(
        self,
        model_path: Path,
        settings: AsrSettings,
        model_name: str,
        stop: threading.Event | None = None,
    ) -> None:
        self._stop = stop  # the worker's: a long recording is given up when it is set
        try:
            defer_pyav()
            install_tokenizer()  # whisper_tokenizer.py: 20 MB less than `tokenizers`
            self._model = _whisper_model_class()(
                str(model_path),
                device="cpu",
                compute_type=settings.compute_type,
                cpu_threads=settings.cpu_threads,
                num_workers=1,
            )
            self._suppress_tokens = self._non_speech_tokens()
        except Exception as exc:  # CTranslate2 raises RuntimeError/ValueError on bad files
            raise AsrError(load_error("ASR model", model_path, exc)) from exc
        self.settings = settings
        self._model_name = model_name
        # Fallback re-decodes low-confidence audio at up to five higher temperatures: on noise
        # that multiplies the cost, and short recordings rarely fall into the loops it fixes.
        self._temperatures = _FALLBACK_TEMPERATURES if settings.temperature_fallback else [0.0]

    def _non_speech_tokens(self) -> list[int]:
        """What faster-whisper suppresses by default (its `suppress_tokens=[-1]`), worked out
        once: it would encode these symbols again for every recording, and the tokenizer's
        encoder tables (10 MB) are then dropped."""
        from faster_whisper.tokenizer import Tokenizer

        hf_tokenizer = self._model.hf_tokenizer
        multilingual = self._model.model.is_multilingual
        language = "en" if multilingual else None  # the symbols' ids do not depend on it
        tokens = list(
            Tokenizer(hf_tokenizer, multilingual, "transcribe", language).non_speech_tokens
        )
        if isinstance(hf_tokenizer, WhisperTokenizer):
            hf_tokenizer.forget_encoder()
            release_memory()
        return tokens

    @property
    def model_name(self) -> str:
        """The configured model's name."""
        return self._model_name

    def ready(self) -> bool:
        """The model is loaded: always ready."""
        return True

    def describe(self) -> dict[str, Any]:
        """The local backend and its model."""
        return {"backend": "local", "model": self._model_name}

    def problem(self) -> str | None:
        """A loaded model has none."""
        return None

    def transcribe(
        self,
        audio: Float32Array,
        vad_trace: Float32Array | None = None,
        wanted: Wanted | None = None,
    ) -> Transcript:
        """Transcribe one recording (whole: the VAD trace is not needed); the lazy segment
        generator is consumed here."""
        s = self.settings
        duration_s = audio.size / SAMPLE_RATE_HZ
        # Whisper hears a short lead-in of silence before the audio (the model's feature
        # extractor puts it there): it misreads a word that starts at sample 0 ("erase" ->
        # "but race"). Times are shifted back below.

        def run(language: str | None) -> tuple[Any, Any]:
            return self._model.transcribe(  # type: ignore[no-any-return]
                audio,
                language=language,
                beam_size=s.beam_size,
                word_timestamps=s.word_timestamps,
                vad_filter=False,  # our own VAD already cut the recording
                condition_on_previous_text=False,
                no_speech_threshold=None,  # keep every segment; judge() flags, never drops
                temperature=self._temperatures,
                suppress_tokens=list(self._suppress_tokens),  # faster-whisper extends it
            )

        try:
            with transcription_heap():  # memory.py: CTranslate2's buffers
                segments, info = run(s.language)
                if s.language is None and s.languages and info.language not in s.languages:
                    # Detection picked a language we do not allow: take the likeliest allowed one.
                    probs = dict(info.all_language_probs or [])
                    segments, info = run(max(s.languages, key=lambda lang: probs.get(lang, 0.0)))
                result = []
                for seg in segments:
                    result.append(self._convert(seg, duration_s))
                    if duration_s > WHISPER_WINDOW_S:  # a window of a long one is done
                        if self._stop and self._stop.is_set():
                            raise Stopped(f"given up {seg.end:.0f} s into {duration_s:.0f} s")
                        # Not before a window's worth is done: each try gets on by that.
                        done_s = result[-1].end_s
                        if done_s >= WHISPER_WINDOW_S and wanted is not None and not wanted():
                            heard = Transcript(str(info.language), duration_s, tuple(result))
                            raise Unwanted(done_s, duration_s, heard)
        except (Stopped, Unwanted):
            raise
        except Exception as exc:  # decoding failures surface while iterating
            raise AsrError(f"transcription failed: {exc}") from exc
        return Transcript(
            language=str(info.language), duration_s=duration_s, segments=tuple(result)
        )

    def _convert(self, seg: Any, duration_s: float) -> Segment:
        def shift(t: float) -> float:
            return round(min(max(0.0, float(t) - LEAD_IN_S), duration_s), 3)

        words = tuple(
            Word(shift(w.start), shift(w.end), str(w.word), float(w.probability))
            for w in (seg.words or ())
        )
        segment = Segment(
            start_s=shift(seg.start),
            end_s=shift(seg.end),
            text=str(seg.text).strip(),
            avg_logprob=float(seg.avg_logprob),
            no_speech_prob=float(seg.no_speech_prob),
            compression_ratio=float(seg.compression_ratio),
            words=words,
        )
        reason = judge(segment, self.settings)
        if reason is None:
            return segment
        return Segment(**{**segment.__dict__, "suspect": reason})
