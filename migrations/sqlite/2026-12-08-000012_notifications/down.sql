DROP TABLE notify_cursors;
DROP TABLE maintenance_windows;
DROP TABLE notifications;
DROP TABLE notify_rules;
DROP TABLE notify_channels;
DROP TABLE vm_tags;
DROP INDEX reset_attempts_untold;
ALTER TABLE reset_attempts DROP COLUMN notice;
DELETE FROM events WHERE kind IN ('latched_manual', 'unexpected_reboot');
DROP TRIGGER events_kind_check_insert;
DROP TRIGGER events_kind_check_update;
CREATE TRIGGER events_kind_check_insert BEFORE INSERT ON events
WHEN NOT (NEW.kind IN ('breaker_tripped','breaker_reset','identity_claim','enrolment_refused','agent_silent','guest_fault','guest_back','reset_held'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: events_kind_check'); END;
CREATE TRIGGER events_kind_check_update BEFORE UPDATE OF kind ON events
WHEN NOT (NEW.kind IN ('breaker_tripped','breaker_reset','identity_claim','enrolment_refused','agent_silent','guest_fault','guest_back','reset_held'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: events_kind_check'); END;
