-- Metric history beyond the raw samples' retention: per-minute and per-hour rollups with
-- min, max and sum per metric (sums, not averages, so a late batch merges exactly), and the
-- position of the job that builds them from the samples it has not yet counted.
CREATE TABLE metric_minutes (
    vm_id BIGINT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    bucket_ms BIGINT NOT NULL,
    samples BIGINT NOT NULL CHECK (samples > 0),
    cpu_min DOUBLE PRECISION NOT NULL,
    cpu_max DOUBLE PRECISION NOT NULL,
    cpu_sum DOUBLE PRECISION NOT NULL,
    ram_min DOUBLE PRECISION NOT NULL,
    ram_max DOUBLE PRECISION NOT NULL,
    ram_sum DOUBLE PRECISION NOT NULL,
    disk_samples BIGINT NOT NULL,
    disk_min DOUBLE PRECISION,
    disk_max DOUBLE PRECISION,
    disk_sum DOUBLE PRECISION,
    uptime_max BIGINT NOT NULL,
    PRIMARY KEY (vm_id, bucket_ms)
);
CREATE INDEX metric_minutes_bucket ON metric_minutes (bucket_ms);
CREATE TABLE metric_hours (
    vm_id BIGINT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    bucket_ms BIGINT NOT NULL,
    samples BIGINT NOT NULL CHECK (samples > 0),
    cpu_min DOUBLE PRECISION NOT NULL,
    cpu_max DOUBLE PRECISION NOT NULL,
    cpu_sum DOUBLE PRECISION NOT NULL,
    ram_min DOUBLE PRECISION NOT NULL,
    ram_max DOUBLE PRECISION NOT NULL,
    ram_sum DOUBLE PRECISION NOT NULL,
    disk_samples BIGINT NOT NULL,
    disk_min DOUBLE PRECISION,
    disk_max DOUBLE PRECISION,
    disk_sum DOUBLE PRECISION,
    uptime_max BIGINT NOT NULL,
    PRIMARY KEY (vm_id, bucket_ms)
);
CREATE INDEX metric_hours_bucket ON metric_hours (bucket_ms);

CREATE TABLE history_jobs (
    name TEXT PRIMARY KEY NOT NULL,
    position BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
INSERT INTO history_jobs (name, position, updated_ms) VALUES ('rollup', 0, 0);
