-- The VIM at 10,000 hosts and 100,000 VMs (issue 17, docs/scale.md).
-- Placement weighs a sample of the reachable hosts, read from a random point of this index on,
-- instead of summing every VM of every host. Each host gets a random key when it is added (hosts
-- from before are given one when vimd opens the database).
ALTER TABLE hosts ADD COLUMN place_key BIGINT NOT NULL DEFAULT 0;
CREATE INDEX hosts_by_place_key ON hosts (state, draining, place_key);
-- What the leader's loops look for every second, found without reading every VM: standbys and
-- their hosts (the standby keeper, placement's sums) and VMs with an auto-suspend setting.
CREATE INDEX vms_by_standby ON vms (standby_host);
CREATE INDEX vms_by_ha ON vms (ha);
CREATE INDEX vms_auto_suspend ON vms (auto_suspend_s);
