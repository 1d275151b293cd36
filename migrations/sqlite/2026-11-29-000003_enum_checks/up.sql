-- SQLite cannot add a CHECK constraint to an existing table without rebuilding it (and a
-- rebuild of `vms` would cascade-delete its history), so triggers enforce the same sets.
-- Each trigger is named <table>_<column>_check, like the PostgreSQL constraints.
CREATE TRIGGER vms_status_check_insert BEFORE INSERT ON vms
WHEN NOT (NEW.status IN ('unknown','healthy','warning','down'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: vms_status_check'); END;
CREATE TRIGGER vms_status_check_update BEFORE UPDATE OF status ON vms
WHEN NOT (NEW.status IN ('unknown','healthy','warning','down'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: vms_status_check'); END;
CREATE TRIGGER vms_remediation_phase_check_insert BEFORE INSERT ON vms
WHEN NOT (NEW.remediation_phase IN ('ok','reset_pending','recovering','manual'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: vms_remediation_phase_check'); END;
CREATE TRIGGER vms_remediation_phase_check_update BEFORE UPDATE OF remediation_phase ON vms
WHEN NOT (NEW.remediation_phase IN ('ok','reset_pending','recovering','manual'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: vms_remediation_phase_check'); END;
CREATE TRIGGER vms_proxmox_type_check_insert BEFORE INSERT ON vms
WHEN NOT (NEW.proxmox_type IS NULL OR NEW.proxmox_type IN ('qemu','lxc'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: vms_proxmox_type_check'); END;
CREATE TRIGGER vms_proxmox_type_check_update BEFORE UPDATE OF proxmox_type ON vms
WHEN NOT (NEW.proxmox_type IS NULL OR NEW.proxmox_type IN ('qemu','lxc'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: vms_proxmox_type_check'); END;
CREATE TRIGGER vms_proxmox_link_source_check_insert BEFORE INSERT ON vms
WHEN NOT (NEW.proxmox_link_source IS NULL OR NEW.proxmox_link_source IN ('report','smbios','name','manual'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: vms_proxmox_link_source_check'); END;
CREATE TRIGGER vms_proxmox_link_source_check_update BEFORE UPDATE OF proxmox_link_source ON vms
WHEN NOT (NEW.proxmox_link_source IS NULL OR NEW.proxmox_link_source IN ('report','smbios','name','manual'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: vms_proxmox_link_source_check'); END;
CREATE TRIGGER reset_attempts_action_check_insert BEFORE INSERT ON reset_attempts
WHEN NOT (NEW.action IN ('reset','reboot','shutdown','stop','start'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: reset_attempts_action_check'); END;
CREATE TRIGGER reset_attempts_action_check_update BEFORE UPDATE OF action ON reset_attempts
WHEN NOT (NEW.action IN ('reset','reboot','shutdown','stop','start'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: reset_attempts_action_check'); END;
CREATE TRIGGER reset_attempts_trigger_source_check_insert BEFORE INSERT ON reset_attempts
WHEN NOT (NEW.trigger_source IN ('scheduler','admin'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: reset_attempts_trigger_source_check'); END;
CREATE TRIGGER reset_attempts_trigger_source_check_update BEFORE UPDATE OF trigger_source ON reset_attempts
WHEN NOT (NEW.trigger_source IN ('scheduler','admin'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: reset_attempts_trigger_source_check'); END;
CREATE TRIGGER reset_attempts_mode_check_insert BEFORE INSERT ON reset_attempts
WHEN NOT (NEW.mode IN ('live','shadow'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: reset_attempts_mode_check'); END;
CREATE TRIGGER reset_attempts_mode_check_update BEFORE UPDATE OF mode ON reset_attempts
WHEN NOT (NEW.mode IN ('live','shadow'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: reset_attempts_mode_check'); END;
CREATE TRIGGER reset_attempts_outcome_check_insert BEFORE INSERT ON reset_attempts
WHEN NOT (NEW.outcome IN ('pending','sent','ok','failed','interrupted','would_reset','left_alone'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: reset_attempts_outcome_check'); END;
CREATE TRIGGER reset_attempts_outcome_check_update BEFORE UPDATE OF outcome ON reset_attempts
WHEN NOT (NEW.outcome IN ('pending','sent','ok','failed','interrupted','would_reset','left_alone'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: reset_attempts_outcome_check'); END;
CREATE TRIGGER status_changes_from_status_check_insert BEFORE INSERT ON status_changes
WHEN NOT (NEW.from_status IN ('unknown','healthy','warning','down'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: status_changes_from_status_check'); END;
CREATE TRIGGER status_changes_from_status_check_update BEFORE UPDATE OF from_status ON status_changes
WHEN NOT (NEW.from_status IN ('unknown','healthy','warning','down'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: status_changes_from_status_check'); END;
CREATE TRIGGER status_changes_to_status_check_insert BEFORE INSERT ON status_changes
WHEN NOT (NEW.to_status IN ('unknown','healthy','warning','down'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: status_changes_to_status_check'); END;
CREATE TRIGGER status_changes_to_status_check_update BEFORE UPDATE OF to_status ON status_changes
WHEN NOT (NEW.to_status IN ('unknown','healthy','warning','down'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: status_changes_to_status_check'); END;
CREATE TRIGGER events_kind_check_insert BEFORE INSERT ON events
WHEN NOT (NEW.kind IN ('breaker_tripped','breaker_reset'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: events_kind_check'); END;
CREATE TRIGGER events_kind_check_update BEFORE UPDATE OF kind ON events
WHEN NOT (NEW.kind IN ('breaker_tripped','breaker_reset'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: events_kind_check'); END;
