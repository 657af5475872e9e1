"""Whose fault a failed transcription request is: the server's or the recording's.

A Wyoming server that answers `Describe` and fails every request (a broken model, a full
GPU, a wrong configuration on its side) used to use up each job's `max_attempts`, leaving
every recording of those hours `failed`. A try counts against the recording only when a
server has transcribed another recording since this one's previous failed try: the servers
work, this audio does not (a recording that breaks the server still runs out of attempts).
Until then the job goes back uncounted and waits, and once a request succeeds the jobs that
waited are due at once.
"""

from __future__ import annotations

from typing import Final

# An uncounted job waits asr.retry_delay_s (at least this), doubling to the second figure.
_MIN_WAIT_S: Final = 1.0
_MAX_WAIT_S: Final = 600.0


class ServerFaults:
    """The worker's record of failed server requests, against the transcripts made."""

    def __init__(self) -> None:
        self._transcripts = 0  # transcripts made, counted to tell "since" apart
        self._failed_at: dict[str, int] = {}  # recording -> transcripts made at its last failure
        self._waiting: dict[str, int] = {}  # recording -> its uncounted tries in a row
        self.problem: str | None = None  # said while two recordings or more wait so

    def wait_s(self, recording_id: str, error: str, retry_delay_s: float) -> float | None:
        """A request for this recording failed: how long its job waits, uncounted, or None
        when the try counts (a transcript was made since its previous failed try)."""
        before = self._failed_at.get(recording_id)
        self._failed_at[recording_id] = self._transcripts
        if before is not None and before < self._transcripts:
            self._waiting.pop(recording_id, None)
            return None
        tries = self._waiting.get(recording_id, 0)
        self._waiting[recording_id] = tries + 1
        if len(self._waiting) >= 2:
            self.problem = f"transcription servers fail every request ({error}): recordings wait"
        return min(max(retry_delay_s, _MIN_WAIT_S) * 2.0**tries, _MAX_WAIT_S)

    def transcribed(self, recording_id: str) -> bool:
        """A transcript was made; True when jobs waited on the servers (due again now)."""
        self._transcripts += 1
        self.forget(recording_id)
        waited = bool(self._waiting)
        self._waiting.clear()
        self.problem = None
        return waited

    def forget(self, recording_id: str) -> None:
        """The recording is transcribed, gone, or failed for good."""
        self._failed_at.pop(recording_id, None)
        self._waiting.pop(recording_id, None)
