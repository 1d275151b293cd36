-- The veto window: an automatic power action announced with a countdown an operator can hold.
ALTER TABLE vms DROP CONSTRAINT vms_remediation_phase_check;
ALTER TABLE vms ADD CONSTRAINT vms_remediation_phase_check CHECK (remediation_phase IN ('ok','reset_pending','recovering','manual','agent_silent','guest_fault','reset_scheduled'));
ALTER TABLE events DROP CONSTRAINT events_kind_check;
ALTER TABLE events ADD CONSTRAINT events_kind_check CHECK (kind IN ('breaker_tripped','breaker_reset','identity_claim','enrolment_refused','agent_silent','guest_fault','guest_back','reset_held'));
