-- The monitor's own Proxmox connection failing and coming back: events and notifications.
-- Tags read from each guest's Proxmox tags (PROXMOX_IMPORT_TAGS), kept beside the operators'.
ALTER TABLE events DROP CONSTRAINT events_kind_check;
ALTER TABLE events ADD CONSTRAINT events_kind_check CHECK (kind IN ('breaker_tripped','breaker_reset','identity_claim','enrolment_refused','agent_silent','guest_fault','guest_back','reset_held','latched_manual','unexpected_reboot','proxmox_unreachable','proxmox_restored'));
ALTER TABLE notifications DROP CONSTRAINT notifications_kind_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_kind_check CHECK (kind IN ('vm_down','vm_recovered','warning_entered','warning_left','power_action_sent','power_action_succeeded','power_action_failed','latched_manual','link_claim_refused','breaker_tripped','breaker_cleared','agent_silent','guest_fault','unexpected_reboot','node_unreachable','still_down','test','proxmox_unreachable','proxmox_restored'));
ALTER TABLE vm_tags ADD COLUMN source TEXT NOT NULL DEFAULT 'operator' CONSTRAINT vm_tags_source_check CHECK (source IN ('operator','proxmox'));
