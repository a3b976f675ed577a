-- Memory hotplug (docs/hotplug.md): the most memory a VM can be resized to while it runs (its
-- VMM is started with --max-memory-mib this); 0 for a VM made before: its memory_mib.
ALTER TABLE vms ADD COLUMN max_memory_mib BIGINT NOT NULL DEFAULT 0;
