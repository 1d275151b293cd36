-- The remediation round reads VMs by phase (announced, in flight, recovering) instead of
-- scanning the fleet.
CREATE INDEX vms_phase ON vms (remediation_phase);
