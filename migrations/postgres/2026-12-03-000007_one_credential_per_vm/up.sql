-- One credential in force per VM: replicas enrolling the same VM at once cannot both hand
-- one out (the second transaction fails and is retried, finding the first's).
CREATE UNIQUE INDEX agent_credentials_in_force ON agent_credentials (vm_id) WHERE revoked_ms IS NULL;
