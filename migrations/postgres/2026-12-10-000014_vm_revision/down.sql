DROP TRIGGER vms_revision ON vms;
DROP FUNCTION vms_next_revision();
ALTER TABLE vms DROP COLUMN revision;
