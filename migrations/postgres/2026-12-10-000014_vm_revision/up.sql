-- Every change to a VM's row raises its revision, so the state cache can tell a newer
-- view from an older one whichever writer sends it last.
ALTER TABLE vms ADD COLUMN revision BIGINT NOT NULL DEFAULT 0;
CREATE FUNCTION vms_next_revision() RETURNS trigger AS $$
BEGIN
  IF NEW.revision = OLD.revision THEN
    NEW.revision := OLD.revision + 1;
  END IF;
  RETURN NEW;
END
$$ LANGUAGE plpgsql;
CREATE TRIGGER vms_revision BEFORE UPDATE ON vms FOR EACH ROW EXECUTE FUNCTION vms_next_revision();
