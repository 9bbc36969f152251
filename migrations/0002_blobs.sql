-- Blob metadata. The bytes live in the object store under `storage_key`, a
-- key unique to each upload (blobs/<ns>/<id>/<name>/<upload uuid>), written
-- before this row is committed by a fenced write.
CREATE TABLE blobs (
    ns                  TEXT    NOT NULL,
    id                  TEXT    NOT NULL,
    -- BLOB so that listing order and prefix bounds are plain byte order.
    name                BLOB    NOT NULL,
    storage_key         TEXT    NOT NULL,
    size                INTEGER NOT NULL,
    sha256              TEXT    NOT NULL,
    content_type        TEXT    NOT NULL,
    cache_control       TEXT,
    content_disposition TEXT,
    -- JSON object of the x-statehouse-meta-* headers (names lowercased, prefix removed).
    user_meta           TEXT    NOT NULL DEFAULT '{}',
    -- The object version at which the blob was written (its ETag).
    version             INTEGER NOT NULL,
    created_at          INTEGER NOT NULL,
    PRIMARY KEY (ns, id, name)
) WITHOUT ROWID;

CREATE INDEX blobs_by_storage_key ON blobs (storage_key);

-- Object-store keys no longer referenced (replaced or deleted blobs), written
-- in the same transaction that dropped the reference; the sweeper deletes them.
CREATE TABLE blob_garbage (
    storage_key TEXT    NOT NULL PRIMARY KEY,
    since       INTEGER NOT NULL
) WITHOUT ROWID;
