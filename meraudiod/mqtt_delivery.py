"""Outbox delivery for the MQTT link: the stored events sent one at a time, in order, and
deleted only after the broker acknowledged them (QoS 1), so a broker outage or a crash loses
nothing; what is sent late carries `"replayed": true`.

It runs on the link's thread, which owns it and calls it between network steps.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from typing import Final

import paho.mqtt.client as paho

from .db import Transaction, cannot_write, is_busy, now
from .messages import LIVE_ONLY_TOPICS, note_dropped, unpack_payload
from .mqtt_client import Waker

_LOGGER = logging.getLogger(__name__)
_REPLAYED_AFTER_S: Final = 10.0
# Delivered events are deleted together, not one transaction each: after this many, or once
# the oldest has waited this long, and on the way out. A crash before that sends them again,
# with the same event_id (consumers deduplicate on it).
_DELETE_BATCH: Final = 100
_DELETE_AFTER_S: Final = 10.0


class OutboxDelivery:
    """The outbox's rows published in order, strictly one in flight, deleted in batches once
    acknowledged."""

    def __init__(self, base: str, waker: Waker) -> None:
        self.base = base
        self._waker = waker  # the link's: set when the next row should go at once
        self._inflight: tuple[int, int] | None = None  # (mid, outbox id)
        self._acked_mids: set[int] = set()
        # Outbox rows up to this id are delivered (or skipped) and wait to be deleted.
        self._delivered_up_to = 0
        self._undeleted = 0
        self._undeleted_since = 0.0  # time.monotonic() of the oldest

    @property
    def in_flight(self) -> bool:
        """An event is published and not yet taken as delivered (its acknowledgement is
        looked for at the next send_next)."""
        return self._inflight is not None

    def acked(self, mid: int) -> None:
        """paho says message `mid` is published (acknowledged, or written at QoS 0)."""
        self._acked_mids.add(mid)

    def unsent(self, conn: sqlite3.Connection) -> int:
        """How many outbox rows are not delivered yet."""
        row = conn.execute(
            "SELECT COUNT(*) FROM outbox WHERE id > ?", (self._delivered_up_to,)
        ).fetchone()
        return int(row[0])

    def delete_due_at(self) -> float | None:
        """When (time.monotonic()) the delivered rows are due to be deleted; None if none."""
        return self._undeleted_since + _DELETE_AFTER_S if self._undeleted else None

    def send_next(
        self, conn: sqlite3.Connection, client: paho.Client, replay_before: float
    ) -> None:
        """Publish the next outbox row once the one in flight is acknowledged. A row made
        before `replay_before` (the end of an outage) or long ago is marked replayed."""
        if self._inflight is not None:
            mid, row_id = self._inflight
            if mid not in self._acked_mids:
                return  # strictly one event in flight: order is kept across any outage
            self._delivered(row_id)
            self._inflight = None
        self._acked_mids.clear()
        row = conn.execute(
            "SELECT id, topic, payload, qos, created_at FROM outbox WHERE id > ?"
            " ORDER BY id LIMIT 1",
            (self._delivered_up_to,),
        ).fetchone()
        if row is None:
            return
        created_at = float(row["created_at"])
        if row["topic"] in LIVE_ONLY_TOPICS and created_at < replay_before:
            # (a speech event queued by a version that still put them in the outbox)
            self._delivered(int(row["id"]))  # "someone is speaking" an outage ago is not news
            self._waker.set()  # the next row at once, not after the idle wait
            return
        payload = unpack_payload(row["payload"])
        if created_at < replay_before or now() - created_at > _REPLAYED_AFTER_S:
            payload["replayed"] = True
        topic = f"{self.base}/{row['topic']}"
        try:
            info = client.publish(topic, json.dumps(payload, ensure_ascii=False), qos=row["qos"])
        except ValueError as exc:  # it can never be sent: drop it rather than retry forever
            _LOGGER.error("MQTT event %d to %.80s dropped: %s", row["id"], topic, exc)
            with Transaction(conn):
                conn.execute("DELETE FROM outbox WHERE id=?", (row["id"],))
                note_dropped(conn, 1)
            self._waker.set()
            return
        if info.rc != paho.MQTT_ERR_SUCCESS:
            return  # not connected after all: the row stays and goes out later
        self._inflight = (info.mid, int(row["id"]))
        if info.mid in self._acked_mids:  # QoS 0, written at once: no PUBACK will wake us
            self._waker.set()

    def _delivered(self, row_id: int) -> None:
        """This outbox row (and every one before it) is done with: deleted with the next batch."""
        if not self._undeleted:
            self._undeleted_since = time.monotonic()
        self._delivered_up_to = row_id
        self._undeleted += 1

    def delete_delivered(self, conn: sqlite3.Connection, force: bool = False) -> None:
        """Delete the delivered rows when a batch is due (or `force`), in one transaction
        without an fsync of its own: a power cut that undoes it only sends them again."""
        if not self._undeleted:
            return
        due = self._undeleted >= _DELETE_BATCH
        if not (force or due or time.monotonic() - self._undeleted_since >= _DELETE_AFTER_S):
            return
        try:
            with Transaction(conn, durable=False):
                conn.execute("DELETE FROM outbox WHERE id <= ?", (self._delivered_up_to,))
        except sqlite3.OperationalError as exc:
            if not (cannot_write(exc) or is_busy(exc)):
                raise
            # Even a delete needs room in the log (and a writable file system), and the write
            # lock (another process may hold it). Deleted with a later batch; on the way out,
            # left to be sent again at the next start (as after a power cut).
            if force:
                _LOGGER.warning(
                    "%d delivered events stay in the outbox (the database cannot be written:"
                    " %s): sent again at the next start",
                    self._undeleted,
                    exc,
                )
            return
        self._undeleted = 0
