-- Rebalancing (docs/balance.md): a VM's anti-affinity group (VMs of one group are kept on
-- different hosts; '' for none), and cluster-wide settings such as the balancer's, as JSON.
ALTER TABLE vms ADD COLUMN affinity_group TEXT NOT NULL DEFAULT '';
CREATE TABLE cluster_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
