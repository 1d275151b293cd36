-- Tags, notification channels and their routing rules, the outbox of notifications (with
-- its dead letters), maintenance windows, and where the notifier has read up to.
CREATE TABLE vm_tags (
    vm_id BIGINT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    PRIMARY KEY (vm_id, tag)
);
CREATE INDEX vm_tags_tag ON vm_tags (tag);

CREATE TABLE notify_channels (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CONSTRAINT notify_channels_kind_check CHECK (kind IN ('webhook','ntfy','gotify','slack','discord','email')),
    target TEXT NOT NULL,
    secret TEXT,
    created_ms BIGINT NOT NULL
);

CREATE TABLE notify_rules (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel_id BIGINT NOT NULL REFERENCES notify_channels(id) ON DELETE CASCADE,
    kinds TEXT NOT NULL DEFAULT '',
    tag TEXT,
    repeat_ms BIGINT,
    created_ms BIGINT NOT NULL
);

CREATE TABLE notifications (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel_id BIGINT NOT NULL REFERENCES notify_channels(id) ON DELETE CASCADE,
    rule_id BIGINT,
    kind TEXT NOT NULL CONSTRAINT notifications_kind_check CHECK (kind IN ('vm_down','vm_recovered','warning_entered','warning_left','power_action_sent','power_action_succeeded','power_action_failed','latched_manual','link_claim_refused','breaker_tripped','breaker_cleared','agent_silent','guest_fault','unexpected_reboot','node_unreachable','still_down','test')),
    vm_id BIGINT,
    message_json TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending' CONSTRAINT notifications_state_check CHECK (state IN ('pending','sent','dead','grouped','dropped')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT NOT NULL,
    last_error TEXT,
    created_ms BIGINT NOT NULL,
    sent_ms BIGINT
);
CREATE INDEX notifications_due ON notifications (state, next_attempt_ms);
CREATE INDEX notifications_pair ON notifications (rule_id, vm_id, kind);

CREATE TABLE maintenance_windows (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name TEXT NOT NULL,
    scope TEXT NOT NULL CONSTRAINT maintenance_windows_scope_check CHECK (scope IN ('all','vm','tag','node')),
    scope_value TEXT,
    starts_ms BIGINT,
    ends_ms BIGINT,
    recurrence TEXT,
    duration_ms BIGINT,
    created_by TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);

-- Append-only sources are read by id from here on: an upgrade does not announce the past.
CREATE TABLE notify_cursors (
    name TEXT PRIMARY KEY,
    last_id BIGINT NOT NULL
);
INSERT INTO notify_cursors (name, last_id) SELECT 'status_changes', COALESCE(MAX(id), 0) FROM status_changes;
INSERT INTO notify_cursors (name, last_id) SELECT 'events', COALESCE(MAX(id), 0) FROM events;
-- When reminders were last looked for (epoch ms).
INSERT INTO notify_cursors (name, last_id) VALUES ('reminders', 0);

-- What was told of each power action: NULL nothing yet, 'sent', 'ended'.
ALTER TABLE reset_attempts ADD COLUMN notice TEXT;
UPDATE reset_attempts SET notice = 'ended';
CREATE INDEX reset_attempts_untold ON reset_attempts (id) WHERE notice IS NULL OR notice = 'sent';

ALTER TABLE events DROP CONSTRAINT events_kind_check;
ALTER TABLE events ADD CONSTRAINT events_kind_check CHECK (kind IN ('breaker_tripped','breaker_reset','identity_claim','enrolment_refused','agent_silent','guest_fault','guest_back','reset_held','latched_manual','unexpected_reboot'));
