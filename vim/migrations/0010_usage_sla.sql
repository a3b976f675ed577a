-- Pay-per-use and the SLA monitor (docs/billing.md, docs/sla.md).
-- What the VM is billed at now (0 0: not billed). Written in the same transaction as every
-- change of its state or size, together with the usage row that says so, so a usage record is
-- never lost nor doubled whatever vimd does between two statements.
ALTER TABLE vms ADD COLUMN billed_vcpus BIGINT NOT NULL DEFAULT 0;
ALTER TABLE vms ADD COLUMN billed_memory_mib BIGINT NOT NULL DEFAULT 0;
-- The VM's availability target (percent), and the month (YYYY-MM) SLA_Violated was last said
-- for, so it is said once a month.
ALTER TABLE vms ADD COLUMN sla_target DOUBLE PRECISION NOT NULL DEFAULT 99.95;
ALTER TABLE vms ADD COLUMN sla_violated_month TEXT NOT NULL DEFAULT '';
-- Usage_Started / Usage_Changed / Usage_Finished, kept for good (events expire; bills do not).
CREATE TABLE usage_records (
    id TEXT PRIMARY KEY,
    ts BIGINT NOT NULL,
    kind TEXT NOT NULL,
    vm_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    vcpus BIGINT NOT NULL,
    memory_mib BIGINT NOT NULL
);
CREATE INDEX usage_by_vm ON usage_records (vm_id, ts);
CREATE INDEX usage_by_owner ON usage_records (owner, ts);
-- A pricing plan's prices from `since` (ms) on; amounts are decimal text, never floats.
CREATE TABLE prices (
    plan TEXT NOT NULL,
    since BIGINT NOT NULL,
    vcpu_hour TEXT NOT NULL,
    gib_hour TEXT NOT NULL,
    currency TEXT NOT NULL,
    PRIMARY KEY (plan, since)
);
-- The plan a consumer pays by (`default` for consumers not named here).
CREATE TABLE consumer_plans (
    consumer TEXT PRIMARY KEY,
    plan TEXT NOT NULL
);
CREATE INDEX events_vm ON events (vm_id, ts);
CREATE INDEX vms_by_host ON vms (host_id);
