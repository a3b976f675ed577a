-- A VM's moving figures (CPU, memory, balloon), which its host reports every second, leave the
-- VM's row for a narrow table keyed by host first (docs/scale.md). A host's refresh then rewrites
-- a few neighbouring rows instead of one wide row per VM spread over the whole `vms` table: at
-- 100,000 VMs that was more page writes a second than one database writer keeps up with.
CREATE TABLE vm_usage (
    host TEXT NOT NULL,
    vm TEXT NOT NULL,
    cpu_pct DOUBLE PRECISION NOT NULL,
    rss_kib BIGINT NOT NULL,
    vmm_cpu_pct DOUBLE PRECISION NOT NULL,
    balloon_mib BIGINT NOT NULL,
    usage_at BIGINT NOT NULL,
    PRIMARY KEY (host, vm)
);
INSERT INTO vm_usage (host, vm, cpu_pct, rss_kib, vmm_cpu_pct, balloon_mib, usage_at)
    SELECT host_id, id, cpu_pct, rss_kib, vmm_cpu_pct, balloon_mib, state_at FROM vms
    WHERE host_id <> '' AND state <> 'deleted';
ALTER TABLE vms DROP COLUMN cpu_pct;
ALTER TABLE vms DROP COLUMN rss_kib;
ALTER TABLE vms DROP COLUMN vmm_cpu_pct;
ALTER TABLE vms DROP COLUMN balloon_mib;
