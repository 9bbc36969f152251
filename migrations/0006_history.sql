-- Replaced and deleted blob bytes are kept for the history retention (a
-- restore may refer to them again); the sweeper deletes those listed longer.
CREATE INDEX blob_garbage_by_since ON blob_garbage (since);
