-- Failover (docs/failover.md): what happens to a VM when its host fails. 'restart': it boots
-- again from its disk on another host; 'off': it stays where it was.
ALTER TABLE vms ADD COLUMN ha TEXT NOT NULL DEFAULT 'restart';
-- Which of a failed host's VMs restart first: higher first.
ALTER TABLE vms ADD COLUMN ha_priority BIGINT NOT NULL DEFAULT 0;
