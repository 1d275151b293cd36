-- Every change to a VM's row raises its revision, so the state cache can tell a newer
-- view from an older one whichever writer sends it last. Statements on the hot paths
-- raise it themselves (the trigger's condition then skips the function call); any other
-- update gets it from this trigger.
ALTER TABLE vms ADD COLUMN revision BIGINT NOT NULL DEFAULT 0;
CREATE FUNCTION vms_next_revision() RETURNS trigger AS $$
BEGIN
  NEW.revision := OLD.revision + 1;
  RETURN NEW;
END
$$ LANGUAGE plpgsql;
CREATE TRIGGER vms_revision BEFORE UPDATE ON vms FOR EACH ROW
WHEN (NEW.revision = OLD.revision)
EXECUTE FUNCTION vms_next_revision();
