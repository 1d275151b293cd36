-- Back to the phases and events before the second opinion; held VMs return to ok.
UPDATE vms SET remediation_phase = 'ok' WHERE remediation_phase IN ('agent_silent','guest_fault');
DELETE FROM events WHERE kind IN ('agent_silent','guest_fault','guest_back');
ALTER TABLE vms DROP CONSTRAINT vms_remediation_phase_check;
ALTER TABLE vms ADD CONSTRAINT vms_remediation_phase_check CHECK (remediation_phase IN ('ok','reset_pending','recovering','manual'));
ALTER TABLE events DROP CONSTRAINT events_kind_check;
ALTER TABLE events ADD CONSTRAINT events_kind_check CHECK (kind IN ('breaker_tripped','breaker_reset','identity_claim','enrolment_refused'));
