DROP INDEX vms_phase;
