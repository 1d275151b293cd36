-- Times are epoch milliseconds; booleans are integers, as diesel's Bool maps them on SQLite.
CREATE TABLE vms (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    hostname TEXT NOT NULL,
    os TEXT NOT NULL,
    machine_id TEXT,
    agent_version TEXT,
    reported_vmid BIGINT,
    reported_node TEXT,
    proxmox_node TEXT,
    proxmox_vmid BIGINT,
    proxmox_type TEXT,
    auto_reset BOOLEAN NOT NULL DEFAULT 1,
    status TEXT NOT NULL,
    status_since_ms BIGINT NOT NULL,
    status_reason TEXT NOT NULL,
    first_seen_ms BIGINT NOT NULL,
    last_seen_ms BIGINT,
    observed_at_ms BIGINT,
    cpu_percent DOUBLE PRECISION,
    ram_used_bytes BIGINT,
    ram_total_bytes BIGINT,
    disk_used_bytes BIGINT,
    disk_total_bytes BIGINT,
    disk_max_percent DOUBLE PRECISION,
    disks_json TEXT,
    uptime_seconds BIGINT
);
CREATE UNIQUE INDEX vms_machine_id ON vms (machine_id) WHERE machine_id IS NOT NULL;
CREATE UNIQUE INDEX vms_hostname_without_machine_id ON vms (hostname) WHERE machine_id IS NULL;
CREATE INDEX vms_hostname ON vms (hostname);
CREATE INDEX vms_status_last_seen ON vms (status, last_seen_ms);

CREATE TABLE metric_samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id BIGINT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    observed_ms BIGINT NOT NULL,
    received_ms BIGINT NOT NULL,
    cpu_percent DOUBLE PRECISION NOT NULL,
    ram_used_bytes BIGINT NOT NULL,
    ram_total_bytes BIGINT NOT NULL,
    disk_used_bytes BIGINT NOT NULL,
    disk_total_bytes BIGINT NOT NULL,
    disk_max_percent DOUBLE PRECISION,
    uptime_seconds BIGINT NOT NULL
);
CREATE INDEX metric_samples_vm_time ON metric_samples (vm_id, observed_ms);

CREATE TABLE status_changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id BIGINT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    from_status TEXT NOT NULL,
    to_status TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX status_changes_vm_time ON status_changes (vm_id, at_ms);

CREATE TABLE reset_attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id BIGINT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    action TEXT NOT NULL,
    trigger_source TEXT NOT NULL,
    requested_by TEXT,
    mode TEXT NOT NULL,
    proxmox_node TEXT,
    proxmox_vmid BIGINT,
    upid TEXT,
    outcome TEXT NOT NULL,
    error TEXT,
    evidence_json TEXT,
    created_ms BIGINT NOT NULL,
    sent_ms BIGINT,
    finished_ms BIGINT
);
CREATE INDEX reset_attempts_vm_time ON reset_attempts (vm_id, created_ms);

CREATE TABLE runtime_config (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);

CREATE TABLE credentials (
    name TEXT PRIMARY KEY NOT NULL,
    token_hash TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
