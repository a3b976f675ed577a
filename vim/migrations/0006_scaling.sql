-- Automatic vertical scaling (docs/scaling.md). A policy belongs to a consumer (scope
-- 'consumer:NAME', for all its VMs) or to one VM ('vm:ID', which wins over its owner's).
CREATE TABLE scaling_policies (
    scope TEXT PRIMARY KEY,
    enabled BIGINT NOT NULL DEFAULT 1,
    up_pct BIGINT NOT NULL,
    up_window_s BIGINT NOT NULL,
    down_pct BIGINT NOT NULL,
    down_window_s BIGINT NOT NULL,
    min_vcpus BIGINT NOT NULL,
    min_memory_mib BIGINT NOT NULL,
    max_vcpus BIGINT NOT NULL,
    max_memory_mib BIGINT NOT NULL,
    cooldown_s BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
-- When the VIM last resized the VM on its own (ms since the epoch; 0: never): the cool-down.
ALTER TABLE vms ADD COLUMN scaled_at BIGINT NOT NULL DEFAULT 0;
