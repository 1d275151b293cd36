ALTER TABLE events DROP CONSTRAINT events_kind_check;
ALTER TABLE events ADD CONSTRAINT events_kind_check CHECK (kind IN ('breaker_tripped','breaker_reset'));
DROP TABLE enrolment_tokens;
DROP TABLE agent_credentials;
