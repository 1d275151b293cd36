-- Remediation state per VM: how it is linked to Proxmox and where its current incident stands.
ALTER TABLE vms ADD COLUMN proxmox_link_source TEXT;
ALTER TABLE vms ADD COLUMN remediation_phase TEXT NOT NULL DEFAULT 'ok';
ALTER TABLE vms ADD COLUMN phase_reason TEXT;
ALTER TABLE vms ADD COLUMN incident_attempts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE vms ADD COLUMN next_action_ms BIGINT;
ALTER TABLE vms ADD COLUMN last_reset_ms BIGINT;

-- Fleet-level happenings: breaker trips and recoveries, leadership, amnesty.
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    vm_id BIGINT,
    message TEXT NOT NULL
);
CREATE INDEX events_time ON events (at_ms);
