DROP TABLE credentials;
DROP TABLE runtime_config;
DROP TABLE reset_attempts;
DROP TABLE status_changes;
DROP TABLE metric_samples;
DROP TABLE vms;
