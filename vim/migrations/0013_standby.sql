-- Standby VMs (docs/standby.md): a VM with HA policy 'standby' has a standby VMM on another host,
-- which failover promotes. Where it is, and when that host last reported it (ms since the epoch).
ALTER TABLE vms ADD COLUMN standby_host TEXT NOT NULL DEFAULT '';
ALTER TABLE vms ADD COLUMN standby_seen BIGINT NOT NULL DEFAULT 0;
