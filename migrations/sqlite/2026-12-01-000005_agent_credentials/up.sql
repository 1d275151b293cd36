-- Each VM reports with its own credential; its identity comes from the credential, never
-- from what the report says. Only SHA-256 hashes of credentials and tokens are stored.
CREATE TABLE agent_credentials (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id BIGINT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    token_hash TEXT NOT NULL UNIQUE,
    created_ms BIGINT NOT NULL,
    -- When the credential became the VM's identity: its first use, or its issue by an
    -- admin. NULL while its agent has not moved over to it.
    confirmed_ms BIGINT,
    revoked_ms BIGINT
);
CREATE INDEX agent_credentials_vm ON agent_credentials (vm_id);

-- Tokens an admin hands out for agents to enrol with: fleet-wide (with an expiry and a
-- use count) or bound to one Proxmox guest, which the enrolled VM is then linked to.
CREATE TABLE enrolment_tokens (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    token_hash TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT,
    max_uses BIGINT,
    uses BIGINT NOT NULL DEFAULT 0,
    guest_node TEXT,
    guest_vmid BIGINT,
    guest_type TEXT,
    revoked_ms BIGINT,
    last_used_ms BIGINT
);

DROP TRIGGER events_kind_check_insert;
DROP TRIGGER events_kind_check_update;
CREATE TRIGGER events_kind_check_insert BEFORE INSERT ON events
WHEN NOT (NEW.kind IN ('breaker_tripped','breaker_reset','identity_claim','enrolment_refused'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: events_kind_check'); END;
CREATE TRIGGER events_kind_check_update BEFORE UPDATE OF kind ON events
WHEN NOT (NEW.kind IN ('breaker_tripped','breaker_reset','identity_claim','enrolment_refused'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: events_kind_check'); END;
CREATE TRIGGER enrolment_tokens_guest_type_check_insert BEFORE INSERT ON enrolment_tokens
WHEN NOT (NEW.guest_type IS NULL OR NEW.guest_type IN ('qemu','lxc'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: enrolment_tokens_guest_type_check'); END;
