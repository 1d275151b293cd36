DROP TRIGGER vms_revision;
ALTER TABLE vms DROP COLUMN revision;
