-- Replicated checkpoints (docs/checkpoint.md): a VM with HA policy 'resume' is checkpointed
-- this often, and resumes from its newest checkpoint when its host fails.
ALTER TABLE vms ADD COLUMN checkpoint_ms BIGINT NOT NULL DEFAULT 5000;
