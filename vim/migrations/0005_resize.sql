-- vCPU hotplug (docs/hotplug.md): the most vCPUs a VM can be resized to while it runs (its VMM
-- is started with --max-vcpus this); 0 for a VM made before: its vcpus.
ALTER TABLE vms ADD COLUMN max_vcpus BIGINT NOT NULL DEFAULT 0;
