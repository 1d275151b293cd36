-- Tags, notification channels and their routing rules, the outbox of notifications (with
-- its dead letters), maintenance windows, and where the notifier has read up to.
CREATE TABLE vm_tags (
    vm_id INTEGER NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    PRIMARY KEY (vm_id, tag)
);
CREATE INDEX vm_tags_tag ON vm_tags (tag);

CREATE TABLE notify_channels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    secret TEXT,
    created_ms BIGINT NOT NULL
);
CREATE TRIGGER notify_channels_kind_check_insert BEFORE INSERT ON notify_channels
WHEN NOT (NEW.kind IN ('webhook','ntfy','gotify','slack','discord','email'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: notify_channels_kind_check'); END;
CREATE TRIGGER notify_channels_kind_check_update BEFORE UPDATE OF kind ON notify_channels
WHEN NOT (NEW.kind IN ('webhook','ntfy','gotify','slack','discord','email'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: notify_channels_kind_check'); END;

CREATE TABLE notify_rules (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel_id INTEGER NOT NULL REFERENCES notify_channels(id) ON DELETE CASCADE,
    kinds TEXT NOT NULL DEFAULT '',
    tag TEXT,
    repeat_ms BIGINT,
    created_ms BIGINT NOT NULL
);

CREATE TABLE notifications (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel_id INTEGER NOT NULL REFERENCES notify_channels(id) ON DELETE CASCADE,
    rule_id BIGINT,
    kind TEXT NOT NULL,
    vm_id BIGINT,
    message_json TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT NOT NULL,
    last_error TEXT,
    created_ms BIGINT NOT NULL,
    sent_ms BIGINT
);
CREATE INDEX notifications_due ON notifications (state, next_attempt_ms);
CREATE INDEX notifications_pair ON notifications (rule_id, vm_id, kind);
CREATE TRIGGER notifications_kind_check_insert BEFORE INSERT ON notifications
WHEN NOT (NEW.kind IN ('vm_down','vm_recovered','warning_entered','warning_left','power_action_sent','power_action_succeeded','power_action_failed','latched_manual','link_claim_refused','breaker_tripped','breaker_cleared','agent_silent','guest_fault','unexpected_reboot','node_unreachable','still_down','test'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: notifications_kind_check'); END;
CREATE TRIGGER notifications_kind_check_update BEFORE UPDATE OF kind ON notifications
WHEN NOT (NEW.kind IN ('vm_down','vm_recovered','warning_entered','warning_left','power_action_sent','power_action_succeeded','power_action_failed','latched_manual','link_claim_refused','breaker_tripped','breaker_cleared','agent_silent','guest_fault','unexpected_reboot','node_unreachable','still_down','test'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: notifications_kind_check'); END;
CREATE TRIGGER notifications_state_check_insert BEFORE INSERT ON notifications
WHEN NOT (NEW.state IN ('pending','sent','dead','grouped','dropped'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: notifications_state_check'); END;
CREATE TRIGGER notifications_state_check_update BEFORE UPDATE OF state ON notifications
WHEN NOT (NEW.state IN ('pending','sent','dead','grouped','dropped'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: notifications_state_check'); END;

CREATE TABLE maintenance_windows (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    scope_value TEXT,
    starts_ms BIGINT,
    ends_ms BIGINT,
    recurrence TEXT,
    duration_ms BIGINT,
    created_by TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TRIGGER maintenance_windows_scope_check_insert BEFORE INSERT ON maintenance_windows
WHEN NOT (NEW.scope IN ('all','vm','tag','node'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: maintenance_windows_scope_check'); END;
CREATE TRIGGER maintenance_windows_scope_check_update BEFORE UPDATE OF scope ON maintenance_windows
WHEN NOT (NEW.scope IN ('all','vm','tag','node'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: maintenance_windows_scope_check'); END;

-- Append-only sources are read by id from here on: an upgrade does not announce the past.
CREATE TABLE notify_cursors (
    name TEXT PRIMARY KEY NOT NULL,
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

DROP TRIGGER events_kind_check_insert;
DROP TRIGGER events_kind_check_update;
CREATE TRIGGER events_kind_check_insert BEFORE INSERT ON events
WHEN NOT (NEW.kind IN ('breaker_tripped','breaker_reset','identity_claim','enrolment_refused','agent_silent','guest_fault','guest_back','reset_held','latched_manual','unexpected_reboot'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: events_kind_check'); END;
CREATE TRIGGER events_kind_check_update BEFORE UPDATE OF kind ON events
WHEN NOT (NEW.kind IN ('breaker_tripped','breaker_reset','identity_claim','enrolment_refused','agent_silent','guest_fault','guest_back','reset_held','latched_manual','unexpected_reboot'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: events_kind_check'); END;
