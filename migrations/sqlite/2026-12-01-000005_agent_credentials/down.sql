DROP TRIGGER enrolment_tokens_guest_type_check_insert;
DROP TRIGGER events_kind_check_insert;
DROP TRIGGER events_kind_check_update;
CREATE TRIGGER events_kind_check_insert BEFORE INSERT ON events
WHEN NOT (NEW.kind IN ('breaker_tripped','breaker_reset'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: events_kind_check'); END;
CREATE TRIGGER events_kind_check_update BEFORE UPDATE OF kind ON events
WHEN NOT (NEW.kind IN ('breaker_tripped','breaker_reset'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: events_kind_check'); END;
DROP TABLE enrolment_tokens;
DROP TABLE agent_credentials;
