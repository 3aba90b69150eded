-- immagent storage layout, version 1 (PostgreSQL). Applied by Store.init_schema().
-- Idempotent: every statement is IF NOT EXISTS. The schema version lives in
-- immagent_schema; init_schema() refuses a database whose version it does not know.

CREATE TABLE IF NOT EXISTS immagent_schema (
    version     integer     PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- The append-only content log. A row is never updated: digest = blake3(kind || body),
-- so a row with a given digest can only ever hold one body. `refs` are the digests this
-- asset points at (conversation node -> parent node + messages), which lets gc compute
-- reachability in SQL without decoding bodies.
CREATE TABLE IF NOT EXISTS immagent_assets (
    digest      bytea       PRIMARY KEY CHECK (octet_length(digest) = 32),
    kind        smallint    NOT NULL,
    refs        bytea[]     NOT NULL DEFAULT '{}',
    body        bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per agent state. Rows are inserted, or deleted by delete(); never updated.
-- parent_id is deliberately not a foreign key: deleting a parent must not touch its
-- children, and lineage walks stop at a missing parent.
CREATE TABLE IF NOT EXISTS immagent_agents (
    id            uuid        PRIMARY KEY,
    parent_id     uuid,
    name          text        NOT NULL,
    model         text        NOT NULL,
    digest        bytea       NOT NULL,
    system_prompt bytea       NOT NULL,
    conversation  bytea       NOT NULL,
    model_config  bytea       NOT NULL,  -- canonical msgpack of a JSON-like map
    metadata      bytea       NOT NULL,  -- canonical msgpack of a JSON-like map
    created_at    timestamptz NOT NULL,
    seq           bigint      GENERATED ALWAYS AS IDENTITY
);

CREATE INDEX IF NOT EXISTS immagent_agents_parent ON immagent_agents (parent_id);
CREATE INDEX IF NOT EXISTS immagent_agents_name ON immagent_agents (name, seq);
CREATE UNIQUE INDEX IF NOT EXISTS immagent_agents_seq ON immagent_agents (seq);
