-- Host join tokens (docs/packages.md): `vimctl host add NAME --join` makes one; the join script
-- served for it spends it. Only the token's hash is kept.
CREATE TABLE join_tokens (
    token_hash TEXT PRIMARY KEY,
    host_id TEXT NOT NULL,
    shared_dir TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
