-- Live migration between hosts: a migrate job drives child jobs (one per host command) and
-- keeps its parameters; a VM remembers how its last migration went; a draining host takes no
-- new VMs; a VM's state records when vimd last set it, so a heartbeat received before that
-- (written later, in a batch) does not put an older state back.
ALTER TABLE jobs ADD COLUMN parent_id TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN params TEXT NOT NULL DEFAULT '';
ALTER TABLE vms ADD COLUMN last_migration TEXT NOT NULL DEFAULT '';
ALTER TABLE vms ADD COLUMN state_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN draining BIGINT NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS jobs_parent ON jobs (parent_id);
