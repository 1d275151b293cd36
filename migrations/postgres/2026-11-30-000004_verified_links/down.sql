ALTER TABLE vms DROP COLUMN link_verified;
