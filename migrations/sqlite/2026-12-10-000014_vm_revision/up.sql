-- Every change to a VM's row raises its revision, so the state cache can tell a newer
-- view from an older one whichever writer sends it last. Statements on the hot paths
-- raise it themselves; any other update gets it from this trigger (SQLite cannot
-- change NEW in a BEFORE trigger, hence a second update, only where none was made).
ALTER TABLE vms ADD COLUMN revision BIGINT NOT NULL DEFAULT 0;
CREATE TRIGGER vms_revision AFTER UPDATE ON vms FOR EACH ROW
WHEN NEW.revision = OLD.revision
BEGIN
  UPDATE vms SET revision = OLD.revision + 1 WHERE id = NEW.id;
END;
