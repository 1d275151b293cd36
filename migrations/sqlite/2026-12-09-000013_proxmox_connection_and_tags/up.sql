-- The monitor's own Proxmox connection failing and coming back: events and notifications.
-- Tags read from each guest's Proxmox tags (PROXMOX_IMPORT_TAGS), kept beside the operators'.
DROP TRIGGER events_kind_check_insert;
DROP TRIGGER events_kind_check_update;
CREATE TRIGGER events_kind_check_insert BEFORE INSERT ON events
WHEN NOT (NEW.kind IN ('breaker_tripped','breaker_reset','identity_claim','enrolment_refused','agent_silent','guest_fault','guest_back','reset_held','latched_manual','unexpected_reboot','proxmox_unreachable','proxmox_restored'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: events_kind_check'); END;
CREATE TRIGGER events_kind_check_update BEFORE UPDATE OF kind ON events
WHEN NOT (NEW.kind IN ('breaker_tripped','breaker_reset','identity_claim','enrolment_refused','agent_silent','guest_fault','guest_back','reset_held','latched_manual','unexpected_reboot','proxmox_unreachable','proxmox_restored'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: events_kind_check'); END;
DROP TRIGGER notifications_kind_check_insert;
DROP TRIGGER notifications_kind_check_update;
CREATE TRIGGER notifications_kind_check_insert BEFORE INSERT ON notifications
WHEN NOT (NEW.kind IN ('vm_down','vm_recovered','warning_entered','warning_left','power_action_sent','power_action_succeeded','power_action_failed','latched_manual','link_claim_refused','breaker_tripped','breaker_cleared','agent_silent','guest_fault','unexpected_reboot','node_unreachable','still_down','test','proxmox_unreachable','proxmox_restored'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: notifications_kind_check'); END;
CREATE TRIGGER notifications_kind_check_update BEFORE UPDATE OF kind ON notifications
WHEN NOT (NEW.kind IN ('vm_down','vm_recovered','warning_entered','warning_left','power_action_sent','power_action_succeeded','power_action_failed','latched_manual','link_claim_refused','breaker_tripped','breaker_cleared','agent_silent','guest_fault','unexpected_reboot','node_unreachable','still_down','test','proxmox_unreachable','proxmox_restored'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: notifications_kind_check'); END;
ALTER TABLE vm_tags ADD COLUMN source TEXT NOT NULL DEFAULT 'operator';
CREATE TRIGGER vm_tags_source_check_insert BEFORE INSERT ON vm_tags
WHEN NOT (NEW.source IN ('operator','proxmox'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: vm_tags_source_check'); END;
CREATE TRIGGER vm_tags_source_check_update BEFORE UPDATE OF source ON vm_tags
WHEN NOT (NEW.source IN ('operator','proxmox'))
BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: vm_tags_source_check'); END;
