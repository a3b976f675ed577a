-- VM networking: a VM's NIC has one MAC for life, picked at create (empty: no NIC), so it is the
-- same on every host the VM runs on.
ALTER TABLE vms ADD COLUMN mac TEXT NOT NULL DEFAULT '';
-- A migration's latest progress (round, bytes written, dirty rate) as its source reports it, JSON.
ALTER TABLE jobs ADD COLUMN progress TEXT NOT NULL DEFAULT '';
-- The newest VM report (its agent's sequence number) vimd applied: an older report that arrives
-- later (a heartbeat taken before an answer) does not undo it. Reset when the VM changes host.
ALTER TABLE vms ADD COLUMN report_seq BIGINT NOT NULL DEFAULT 0;
