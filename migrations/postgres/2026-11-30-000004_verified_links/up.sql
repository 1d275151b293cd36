-- A link to a Proxmox guest is acted on only once verified: made or approved by an
-- operator, or an unambiguous SMBIOS uuid match where auto-approval is on. A VMID or a
-- name that an agent claims is only a proposal.
ALTER TABLE vms ADD COLUMN link_verified BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE vms SET link_verified = TRUE WHERE proxmox_link_source = 'manual';
