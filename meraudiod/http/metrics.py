"""Readiness checks and Prometheus metrics, read when asked (nothing is counted per frame)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

from fastapi.responses import Response

from ..config import Settings
from ..db import DatabaseError, open_db
from ..retention import disk_free_mb, read_only_dirs
from ..status import status
from .common import HttpContext


def disk_room(settings: Settings, unwritable: str | None = None) -> dict[str, Any]:
    """The data and audio directories' free space: not ok on a read-only file system or
    below retention.min_free_disk_mb (no audio is written, uploads are refused), or with
    nothing free at all (the guard off), where the database cannot grow; nor while the
    daemon's stages cannot write (`unwritable`, as they met it). One statvfs each: cheap
    enough to poll."""
    read_only = read_only_dirs(settings)
    if read_only:
        return {"ok": False, "detail": f"read-only file system: {read_only[0]}"}
    if unwritable is not None:
        return {"ok": False, "detail": unwritable}
    least_mb = settings.retention.min_free_disk_mb
    said = []
    for path in dict.fromkeys((settings.storage.data_dir, settings.storage.audio_dir)):
        free_mb = disk_free_mb(path)
        if free_mb <= 0:
            return {"ok": False, "detail": f"disk full: 0 MB free in {path}"}
        if free_mb < least_mb:
            return {
                "ok": False,
                "detail": f"disk almost full: {free_mb:.0f} MB free in {path}, under"
                f" retention.min_free_disk_mb ({least_mb:g})",
            }
        said.append(f"{free_mb:.0f} MB free in {path}")
    return {"ok": True, "detail": "; ".join(said)}


def readiness(ctx: HttpContext) -> dict[str, dict[str, Any]]:
    """Models loaded, database writable, room on its and the audio's disk, microphone, MQTT:
    each ok or not, with a detail."""
    daemon = ctx.daemon
    checks: dict[str, dict[str, Any]] = {}
    if daemon is not None:
        pipeline = daemon.pipeline
        loaded = pipeline.opened and (pipeline.worker is not None or not ctx.settings.asr.enabled)
        checks["models"] = {"ok": loaded, "detail": "loaded" if loaded else "not loaded"}
    try:
        conn = open_db(ctx.settings.storage.db_path)
        try:
            conn.execute("BEGIN IMMEDIATE")  # takes the write lock: the database is writable
            conn.execute("ROLLBACK")
        finally:
            conn.close()
        checks["database"] = {"ok": True, "detail": "writable"}
    except (sqlite3.Error, DatabaseError) as exc:
        checks["database"] = {"ok": False, "detail": str(exc)}
    checks["disk"] = disk_room(
        ctx.settings, daemon.health.storage_problem if daemon is not None else None
    )
    if daemon is not None:
        problem = daemon.mic_problem
        detail = problem or (daemon.source.name if daemon.listening else "muted")
        checks["microphone"] = {"ok": problem is None, "detail": detail}
        mqtt = daemon.mqtt
        if mqtt is not None:
            online = bool(mqtt.online)
            checks["mqtt"] = {
                "ok": online,
                "detail": "connected" if online else (mqtt.last_error or "connecting"),
            }
    return checks


class _Collector:
    """Builds the metric families from the database and the running stages on each scrape."""

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Any]:
        """The metrics of one scrape."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        ctx = self.ctx
        daemon = ctx.daemon
        snapshot = daemon.snapshot() if daemon is not None else None
        with ctx.connect() as conn:
            info = status(conn, ctx.settings, disk_use=False, heartbeat=snapshot)
            recent = conn.execute(
                "SELECT AVG(latency_ms), AVG(rtf), COUNT(*) FROM (SELECT latency_ms, rtf"
                " FROM recordings WHERE transcribed_at IS NOT NULL ORDER BY id DESC LIMIT 100)"
            ).fetchone()
            total = conn.execute("SELECT COUNT(*) FROM recordings").fetchone()[0]
        listener = daemon.listener if daemon is not None else None
        frames = CounterMetricFamily("meraudiod_frames", "Audio frames read by the listener")
        frames.add_metric([], listener.frames_read if listener is not None else 0)
        yield frames
        drops = CounterMetricFamily("meraudiod_dropped_frames", "Frames the source dropped")
        drops.add_metric([], daemon.source.dropped_frames if daemon is not None else 0)
        yield drops
        yield GaugeMetricFamily("meraudiod_recordings", "Recordings stored", value=total)
        yield GaugeMetricFamily(
            "meraudiod_backlog_jobs", "Jobs pending or running", value=info["backlog"]
        )
        jobs = GaugeMetricFamily("meraudiod_jobs", "Jobs per state", labels=["state"])
        for state, count in info["jobs"].items():
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily(
            "meraudiod_job_latency_ms",
            "Mean time from end of speech to stored transcript, last 100 recordings",
            value=float(recent[0] or 0.0),
        )
        yield GaugeMetricFamily(
            "meraudiod_rtf",
            "Mean transcription time over audio duration, last 100 recordings",
            value=float(recent[1] or 0.0),
        )
        yield GaugeMetricFamily(
            "meraudiod_outbox_depth", "Events waiting for MQTT", value=info["outbox_pending"]
        )
        yield CounterMetricFamily(
            "meraudiod_outbox_dropped", "Events dropped undelivered", value=info["outbox_dropped"]
        )
        yield GaugeMetricFamily(
            "meraudiod_failed_jobs", "Jobs that used their attempts", value=info["jobs"]["failed"]
        )
        worker = daemon.pipeline.worker if daemon is not None else None
        yield GaugeMetricFamily(
            "meraudiod_worker_error",
            "1 once a job has failed since the daemon started",
            value=1 if worker is not None and worker.last_error else 0,
        )
        yield GaugeMetricFamily(
            "meraudiod_disk_free_mb", "Free space on the data disk", value=info["disk_free_mb"]
        )
        unsaved = info["unsaved"]  # the running daemon's, from its snapshot (status.py)
        yield GaugeMetricFamily(
            "meraudiod_unsaved_recordings",
            "Recordings the database has not taken yet (its disk full or read-only, or locked)",
            value=unsaved["recordings"] or 0,
        )
        yield GaugeMetricFamily(
            "meraudiod_unsaved_audio",
            "Recordings whose audio waits in memory for the audio directory's disk",
            value=unsaved["audio"] or 0,
        )


def metrics_registry(ctx: HttpContext) -> Any:
    """A registry of its own (not the process-wide default) whose one collector reads the
    database and the stages at each scrape."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(ctx))
    return registry


def metrics_response(registry: Any) -> Response:
    """The text format Prometheus scrapes."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
