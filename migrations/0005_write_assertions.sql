-- Assertions for writes sent as one request. A batch of statements sent to a
-- libSQL server can make a step depend on whether an earlier step succeeded,
-- not on how many rows it changed; so a write's fence check is a statement
-- that fails: it inserts a row here only when the object's row no longer
-- has this replica's fence (and the version the write was planned on), and
-- the CHECK refuses every row. The steps after a failed assertion do not
-- run; the table stays empty.
CREATE TABLE write_assertions (
    failed TEXT CONSTRAINT assertion_failed CHECK (failed IS NULL)
);
