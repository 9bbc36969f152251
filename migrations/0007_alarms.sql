-- Durable timers of objects. A row is written by the fenced writes of its
-- object (set, delete, and the outcome of each delivery), so only the
-- owner's fence moves it; the delivery pass of every replica finds due rows
-- through `alarms_by_due`, across all objects, and fires those it owns.
CREATE TABLE alarms (
    ns            TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    name          TEXT    NOT NULL,
    -- Unix ms: the time the alarm is for. Lateness is measured from it; a
    -- repeating alarm's next time is this plus every_ms (no drift).
    scheduled_at  INTEGER NOT NULL,
    -- Unix ms: when to deliver next (scheduled_at, or a retry's time).
    due_at        INTEGER NOT NULL,
    every_ms      INTEGER,
    -- JSON text, or NULL.
    payload       TEXT,
    -- Deliveries already attempted for this scheduled time.
    attempt       INTEGER NOT NULL DEFAULT 0,
    -- The object version at which this arming was set (kept by retries and
    -- repeats' recording): what receivers deduplicate by, with attempt.
    armed_version INTEGER NOT NULL,
    -- The object version at which the row was last written (its ETag).
    version       INTEGER NOT NULL,
    PRIMARY KEY (ns, id, name)
) WITHOUT ROWID;

CREATE INDEX alarms_by_due ON alarms (due_at, ns, id, name);
