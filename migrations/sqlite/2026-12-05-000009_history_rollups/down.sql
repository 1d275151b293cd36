DROP TABLE history_jobs;
DROP TABLE metric_hours;
DROP TABLE metric_minutes;
