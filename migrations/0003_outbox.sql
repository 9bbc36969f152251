-- Every committed change and every application event, written in the same
-- transaction as the change it describes, waiting to be exported to Iceberg.
-- `seq` gives commit order (writers are serialised by the write lock). Each
-- Iceberg snapshot names the last seq it holds, and the exporter reads only
-- rows past it, so each row is exported exactly once; it deletes exported rows
-- afterwards.
CREATE TABLE outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    -- 'event' or 'change'
    kind            TEXT    NOT NULL,
    ns              TEXT    NOT NULL,
    id              TEXT    NOT NULL,
    -- The object version this change or event was committed at, the fence it
    -- was committed under, and the replica that committed it.
    version         INTEGER NOT NULL,
    fence           INTEGER NOT NULL,
    instance        TEXT    NOT NULL,
    -- Unix microseconds: the commit time, or the time the client gave an event.
    ts              INTEGER NOT NULL,
    -- Events: a UUID v7, the client's type, and its JSON data as text.
    event_id        TEXT,
    type            TEXT,
    data            TEXT,
    -- Changes: put, delete, delete_all, blob_put, blob_delete; the key or blob name;
    -- the value's content type and full size, and its bytes up to the export cap.
    op              TEXT,
    key             TEXT,
    content_type    TEXT,
    size            INTEGER,
    value           BLOB,
    value_truncated INTEGER
);
