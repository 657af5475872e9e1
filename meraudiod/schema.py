"""The database's schema as numbered migrations, applied in order by `db.migrate`.

Migration N takes a database from `PRAGMA user_version` N-1 to N.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

MIGRATIONS: Final[Sequence[str]] = (
    # 1: the listening core and transcription
    """
    CREATE TABLE recordings (
        id TEXT PRIMARY KEY,                 -- ULID: sorts by creation time
        source TEXT NOT NULL,
        started_at REAL NOT NULL,            -- wall clock, Unix seconds
        ended_at REAL NOT NULL,
        start_s REAL NOT NULL,               -- offsets into the source stream
        end_s REAL NOT NULL,
        duration_s REAL NOT NULL,
        audio_path TEXT,                     -- NULL once the audio is purged
        rms_dbfs REAL NOT NULL,
        closed_at REAL NOT NULL,             -- wall clock when the segmenter closed it
        status TEXT NOT NULL DEFAULT 'pending',  -- pending, done, suspect, failed
        text TEXT,
        language TEXT,
        model TEXT,
        rtf REAL,                            -- transcription time / audio duration
        latency_ms REAL,                     -- closed_at -> transcript stored
        transcribed_at REAL
    );
    CREATE INDEX recordings_started ON recordings(started_at);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        recording_id TEXT NOT NULL REFERENCES recordings(id) ON DELETE CASCADE,
        kind TEXT NOT NULL DEFAULT 'transcribe',
        state TEXT NOT NULL DEFAULT 'pending',   -- pending, running, done, failed
        attempts INTEGER NOT NULL DEFAULT 0,
        lease_until REAL,
        owner TEXT,
        error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX jobs_state ON jobs(state, id);
    CREATE TABLE segments (
        id INTEGER PRIMARY KEY,
        recording_id TEXT NOT NULL REFERENCES recordings(id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        start_s REAL NOT NULL,
        end_s REAL NOT NULL,
        text TEXT NOT NULL,
        language TEXT,
        avg_logprob REAL,
        no_speech_prob REAL,
        compression_ratio REAL,
        words TEXT,                          -- JSON [[start_s, end_s, word, probability], ...]
        suspect TEXT,                        -- why it is not trusted as speech, or NULL
        speaker_label TEXT,
        speaker_id TEXT,
        speaker_score REAL,
        emotion TEXT
    );
    CREATE INDEX segments_recording ON segments(recording_id, idx);
    CREATE VIRTUAL TABLE segments_fts USING fts5(text, content='segments', content_rowid='id');
    CREATE TRIGGER segments_ai AFTER INSERT ON segments BEGIN
        INSERT INTO segments_fts(rowid, text) VALUES (new.id, new.text);
    END;
    CREATE TRIGGER segments_ad AFTER DELETE ON segments BEGIN
        INSERT INTO segments_fts(segments_fts, rowid, text) VALUES ('delete', old.id, old.text);
    END;
    """,
    # 2: who spoke
    """
    CREATE TABLE speakers (
        id TEXT PRIMARY KEY,                 -- ULID
        name TEXT NOT NULL UNIQUE,
        provisional INTEGER NOT NULL DEFAULT 0,  -- an unknown voice grouped automatically
        opt_out INTEGER NOT NULL DEFAULT 0,      -- "do not keep": matched recordings are deleted
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE speaker_embeddings (
        id INTEGER PRIMARY KEY,
        speaker_id TEXT NOT NULL REFERENCES speakers(id) ON DELETE CASCADE,
        model TEXT NOT NULL,                 -- embeddings of another model are stale
        vector BLOB NOT NULL,                -- float32, L2-normalised
        duration_s REAL NOT NULL,
        recording_id TEXT REFERENCES recordings(id) ON DELETE SET NULL,
        source TEXT,                         -- file it was enrolled from, if any
        created_at REAL NOT NULL
    );
    CREATE INDEX speaker_embeddings_speaker ON speaker_embeddings(speaker_id);
    CREATE TABLE speaker_mappings (
        recording_id TEXT NOT NULL REFERENCES recordings(id) ON DELETE CASCADE,
        label TEXT NOT NULL,                 -- local speaker inside the recording
        speaker_id TEXT REFERENCES speakers(id) ON DELETE SET NULL,
        score REAL,
        margin REAL,
        speech_s REAL NOT NULL,
        PRIMARY KEY (recording_id, label)
    );
    """,
    # 3: events for MQTT, delivered in order after any outage; small persistent state
    """
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,                 -- relative to the base topic
        payload TEXT NOT NULL,
        qos INTEGER NOT NULL DEFAULT 1,
        retain INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        sent_at REAL,
        recording_id TEXT                    -- deleting a recording deletes its events too
    );
    CREATE INDEX outbox_unsent ON outbox(sent_at, id);
    CREATE TABLE kv (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # 4: a failed attempt is retried after a delay, not at once
    """
    ALTER TABLE jobs ADD COLUMN not_before REAL;  -- wall clock; NULL means now
    """,
    # 5: an acknowledged event is deleted, never marked: sent_at and its index (written on
    # every insert and delete) were dead weight
    """
    DROP INDEX outbox_unsent;
    ALTER TABLE outbox DROP COLUMN sent_at;
    """,
    # 6: audio paths relative to the audio directory, so moving, restoring or symlinking the
    # data directory keeps every recording's audio: <dir>/YYYY/MM/DD/<ULID>.<ext> keeps its tail
    """
    UPDATE recordings SET audio_path = substr(audio_path, -42)
    WHERE substr(audio_path, -43) GLOB '/[0-9][0-9][0-9][0-9]/[0-9][0-9]/[0-9][0-9]/*'
    AND substr(audio_path, -32) = '/' || id || '.flac';
    UPDATE recordings SET audio_path = substr(audio_path, -41)
    WHERE substr(audio_path, -42) GLOB '/[0-9][0-9][0-9][0-9]/[0-9][0-9]/[0-9][0-9]/*'
    AND substr(audio_path, -31) = '/' || id || '.wav';
    """,
    # 7: every delete path has an index: deleting a recording scanned these tables
    """
    CREATE INDEX jobs_recording ON jobs(recording_id);
    CREATE INDEX speaker_embeddings_recording ON speaker_embeddings(recording_id);
    CREATE INDEX outbox_recording ON outbox(recording_id);
    """,
    # 8: a job belongs to the process that queued it (`analyze` never takes the daemon's, nor
    # the daemon an analysis in progress); the process dying during a job is counted apart
    # from the job failing, and `attempts` counts failures only
    """
    ALTER TABLE jobs ADD COLUMN origin TEXT;  -- host:pid that queued it; NULL: the daemon's
    ALTER TABLE jobs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0;
    """,
    # 9: speech-start and error events name no recording: the index that deleting a
    # recording's events uses leaves them out, so their insert and their delete (once
    # delivered) do not rewrite its pages
    """
    DROP INDEX outbox_recording;
    CREATE INDEX outbox_recording ON outbox(recording_id) WHERE recording_id IS NOT NULL;
    """,
    # 10: the database's own name, random: what a stopped daemon keeps for its database in a
    # runtime directory that another data directory's daemon may use after it is its own
    """
    INSERT OR IGNORE INTO kv (key, value) VALUES ('database_id', lower(hex(randomblob(8))));
    """,
)
