DROP TABLE events;
ALTER TABLE vms DROP COLUMN last_reset_ms;
ALTER TABLE vms DROP COLUMN next_action_ms;
ALTER TABLE vms DROP COLUMN incident_attempts;
ALTER TABLE vms DROP COLUMN phase_reason;
ALTER TABLE vms DROP COLUMN remediation_phase;
ALTER TABLE vms DROP COLUMN proxmox_link_source;
