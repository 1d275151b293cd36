-- The remediation round reads VMs by phase (announced, in flight, recovering) and stale VMs
-- with no incident (phase and status) instead of scanning the fleet.
CREATE INDEX vms_phase_status ON vms (remediation_phase, status);
