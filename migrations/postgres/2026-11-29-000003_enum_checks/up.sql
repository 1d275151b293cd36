-- Stored enums accept only the values the code knows; anything else is refused at write
-- time, so an unknown state can never be read back as a default.
ALTER TABLE vms ADD CONSTRAINT vms_status_check CHECK (status IN ('unknown','healthy','warning','down'));
ALTER TABLE vms ADD CONSTRAINT vms_remediation_phase_check CHECK (remediation_phase IN ('ok','reset_pending','recovering','manual'));
ALTER TABLE vms ADD CONSTRAINT vms_proxmox_type_check CHECK (proxmox_type IS NULL OR proxmox_type IN ('qemu','lxc'));
ALTER TABLE vms ADD CONSTRAINT vms_proxmox_link_source_check CHECK (proxmox_link_source IS NULL OR proxmox_link_source IN ('report','smbios','name','manual'));
ALTER TABLE reset_attempts ADD CONSTRAINT reset_attempts_action_check CHECK (action IN ('reset','reboot','shutdown','stop','start'));
ALTER TABLE reset_attempts ADD CONSTRAINT reset_attempts_trigger_source_check CHECK (trigger_source IN ('scheduler','admin'));
ALTER TABLE reset_attempts ADD CONSTRAINT reset_attempts_mode_check CHECK (mode IN ('live','shadow'));
ALTER TABLE reset_attempts ADD CONSTRAINT reset_attempts_outcome_check CHECK (outcome IN ('pending','sent','ok','failed','interrupted','would_reset','left_alone'));
ALTER TABLE status_changes ADD CONSTRAINT status_changes_from_status_check CHECK (from_status IN ('unknown','healthy','warning','down'));
ALTER TABLE status_changes ADD CONSTRAINT status_changes_to_status_check CHECK (to_status IN ('unknown','healthy','warning','down'));
ALTER TABLE events ADD CONSTRAINT events_kind_check CHECK (kind IN ('breaker_tripped','breaker_reset'));
