-- Rebalancing (docs/balance.md): a VM's anti-affinity group (VMs of one group are kept on
-- different hosts; '' for none), and cluster-wide settings such as the balancer's, as JSON.
ALTER TABLE vms ADD COLUMN affinity_group TEXT NOT NULL DEFAULT '';
CREATE TABLE cluster_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- Auto-suspend per consumer (docs/suspend.md): for the consumer's VMs that have no setting of
-- their own (vms.auto_suspend_s 0; -1 there is "never", whatever the consumer's).
CREATE TABLE auto_suspend_policies (
    consumer TEXT PRIMARY KEY,
    idle_pct BIGINT NOT NULL,
    idle_s BIGINT NOT NULL
);
-- Webhooks (issue 16): events of the kinds listed (comma-separated) are POSTed to url, signed
-- with secret (HMAC-SHA256); an admin's get every event (all_vms 1), a consumer's only its own
-- VMs'.
CREATE TABLE webhooks (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    all_vms BIGINT NOT NULL,
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
