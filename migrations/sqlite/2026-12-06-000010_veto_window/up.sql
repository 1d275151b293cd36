-- The veto window: an automatic power action announced with a countdown an operator can hold.
DROP TRIGGER vms_remediation_phase_check_insert;
DROP TRIGGER vms_remediation_phase_check_update;
CREATE TRIGGER vms_remediation_phase_check_insert BEFORE INSERT ON vms
WHEN NOT (NEW.remediation_phase IN ('ok','reset_pending','recovering','manual','agent_silent','guest_fault','reset_scheduled'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: vms_remediation_phase_check'); END;
CREATE TRIGGER vms_remediation_phase_check_update BEFORE UPDATE OF remediation_phase ON vms
WHEN NOT (NEW.remediation_phase IN ('ok','reset_pending','recovering','manual','agent_silent','guest_fault','reset_scheduled'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: vms_remediation_phase_check'); END;
DROP TRIGGER events_kind_check_insert;
DROP TRIGGER events_kind_check_update;
CREATE TRIGGER events_kind_check_insert BEFORE INSERT ON events
WHEN NOT (NEW.kind IN ('breaker_tripped','breaker_reset','identity_claim','enrolment_refused','agent_silent','guest_fault','guest_back','reset_held'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: events_kind_check'); END;
CREATE TRIGGER events_kind_check_update BEFORE UPDATE OF kind ON events
WHEN NOT (NEW.kind IN ('breaker_tripped','breaker_reset','identity_claim','enrolment_refused','agent_silent','guest_fault','guest_back','reset_held'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: events_kind_check'); END;
