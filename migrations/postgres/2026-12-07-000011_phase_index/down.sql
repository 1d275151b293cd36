DROP INDEX vms_phase_status;
