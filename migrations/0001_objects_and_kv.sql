-- One row per object: its version counter and the lease/fencing state of the
-- single-writer protocol (see docs/design.md, "Leases and fencing tokens").
CREATE TABLE objects (
    ns               TEXT    NOT NULL,
    id               TEXT    NOT NULL,
    -- Bumped once by every committed change; 0 means nothing was ever committed.
    version          INTEGER NOT NULL DEFAULT 0,
    -- Strictly increasing; bumped whenever ownership changes hands.
    fence            INTEGER NOT NULL DEFAULT 0,
    owner            TEXT,
    owner_url        TEXT,
    owner_machine    TEXT,
    -- Unix milliseconds, by the clock of the replica that took or renewed the lease.
    lease_expires_at INTEGER NOT NULL DEFAULT 0,
    key_count        INTEGER NOT NULL DEFAULT 0,
    bytes            INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    PRIMARY KEY (ns, id)
) WITHOUT ROWID;

-- Keys are BLOBs so that ordering and range bounds are plain byte order
-- (memcmp), whatever the bytes of a computed upper bound are.
CREATE TABLE kv (
    ns           TEXT    NOT NULL,
    id           TEXT    NOT NULL,
    key          BLOB    NOT NULL,
    value        BLOB    NOT NULL,
    content_type TEXT    NOT NULL,
    -- The object version at which this key was last written (its ETag).
    version      INTEGER NOT NULL,
    PRIMARY KEY (ns, id, key)
) WITHOUT ROWID;
