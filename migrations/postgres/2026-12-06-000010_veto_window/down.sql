-- Back to no veto window; a countdown in progress returns to ok (the next round looks again).
UPDATE vms SET remediation_phase = 'ok' WHERE remediation_phase = 'reset_scheduled';
DELETE FROM events WHERE kind = 'reset_held';
ALTER TABLE vms DROP CONSTRAINT vms_remediation_phase_check;
ALTER TABLE vms ADD CONSTRAINT vms_remediation_phase_check CHECK (remediation_phase IN ('ok','reset_pending','recovering','manual','agent_silent','guest_fault'));
ALTER TABLE events DROP CONSTRAINT events_kind_check;
ALTER TABLE events ADD CONSTRAINT events_kind_check CHECK (kind IN ('breaker_tripped','breaker_reset','identity_claim','enrolment_refused','agent_silent','guest_fault','guest_back'));
