-- Auto-suspend (docs/suspend.md): a VM whose CPU use per vCPU stays at or below
-- auto_suspend_pct for auto_suspend_s seconds is suspended; 0 seconds: never.
ALTER TABLE vms ADD COLUMN auto_suspend_pct BIGINT NOT NULL DEFAULT 0;
ALTER TABLE vms ADD COLUMN auto_suspend_s BIGINT NOT NULL DEFAULT 0;
