DELETE FROM vm_tags WHERE source = 'proxmox';
ALTER TABLE vm_tags DROP COLUMN source;
DELETE FROM notifications WHERE kind IN ('proxmox_unreachable', 'proxmox_restored');
DELETE FROM events WHERE kind IN ('proxmox_unreachable', 'proxmox_restored');
ALTER TABLE events DROP CONSTRAINT events_kind_check;
ALTER TABLE events ADD CONSTRAINT events_kind_check CHECK (kind IN ('breaker_tripped','breaker_reset','identity_claim','enrolment_refused','agent_silent','guest_fault','guest_back','reset_held','latched_manual','unexpected_reboot'));
ALTER TABLE notifications DROP CONSTRAINT notifications_kind_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_kind_check CHECK (kind IN ('vm_down','vm_recovered','warning_entered','warning_left','power_action_sent','power_action_succeeded','power_action_failed','latched_manual','link_claim_refused','breaker_tripped','breaker_cleared','agent_silent','guest_fault','unexpected_reboot','node_unreachable','still_down','test'));
