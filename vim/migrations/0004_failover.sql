-- Failover (docs/failover.md): what happens to a VM when its host fails. 'restart': it boots
-- again from its disk on another host; 'off': it stays where it was.
ALTER TABLE vms ADD COLUMN ha TEXT NOT NULL DEFAULT 'restart';
