-- immagent storage layout, version 3 (PostgreSQL). Applied by Store.init_schema(), which
-- also migrates a version-1 or version-2 database (Backend.migrate). Idempotent: every statement is
-- IF NOT EXISTS / OR REPLACE. The version lives in immagent_schema; init_schema() refuses
-- a database whose version it does not know. store/sqlite.py holds the same layout for
-- SQLite; tests/test_schema.py checks both against immagent/store/layout.py.

CREATE TABLE IF NOT EXISTS immagent_schema (
    version     integer     PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- The append-only content log. A row is never updated: its digest is blake3 over the
-- kind, refs and canonical body (assets.digest_of), so a digest can only ever name one row.
-- `refs` holds the digests this asset points at (a node -> its parent node, then its
-- elements), concatenated 32 bytes each, NULL when there are none; a node's links are
-- stored only here, and gc computes reachability from it in SQL without decoding bodies.
-- `codec` says how `body` is stored (immagent.codec: 0 as is, 1 zstd, n >= 2 zstd with
-- dictionary n); the digest never depends on it. Rows are kept lean on purpose (no
-- timestamp, no array headers): every conversation turn adds about three of them. The
-- digest is unique through a hash index (an exclusion constraint; ON CONFLICT DO NOTHING
-- arbitrates on it): 4-byte hash codes instead of a B-tree's 32-byte keys, measured 35
-- instead of 76 bytes per asset, and nothing reads digests in order.
CREATE TABLE IF NOT EXISTS immagent_assets (
    digest      bytea       NOT NULL CHECK (octet_length(digest) = 32),
    kind        smallint    NOT NULL,
    codec       smallint    NOT NULL DEFAULT 0,
    refs        bytea       CHECK (octet_length(refs) % 32 = 0),
    body        bytea       NOT NULL,
    CONSTRAINT immagent_assets_digest EXCLUDE USING hash (digest WITH =)
);

-- The digests in a refs value, in order (the first is a node's parent when it has one).
-- STRICT keeps the planner from inlining it into generate_series, whose default estimate
-- of 1000 rows per call made gc plans spill to thousands of hash batches; ROWS 3 is the
-- typical node (parent + user + assistant).
CREATE OR REPLACE FUNCTION immagent_refs(refs bytea) RETURNS SETOF bytea
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE ROWS 3 AS $$
    SELECT substring(refs FROM i * 32 + 1 FOR 32)
      FROM generate_series(0, coalesce(octet_length(refs), 0) / 32 - 1) AS i
$$;

-- Every client's states (records.StateRow): an agent state, a checkpoint, a session
-- state. Rows are inserted, or deleted; never updated. `stream` is what a client looks
-- its states up by (an agent's name, a session's id); `refs` are the digests the state
-- pins (gc marks from them); `body` is the rest of its content; `digest` the hash of it.
-- parent_id is deliberately not a foreign key: deleting a parent must not touch its
-- children, and lineage walks stop at a missing parent. seq is the commit-order position
-- in the log.
CREATE TABLE IF NOT EXISTS immagent_states (
    id          uuid        PRIMARY KEY,
    parent_id   uuid,
    kind        smallint    NOT NULL,
    stream      text        NOT NULL,
    refs        bytea       NOT NULL CHECK (octet_length(refs) % 32 = 0),
    digest      bytea       NOT NULL CHECK (octet_length(digest) = 32),
    created_at  timestamptz NOT NULL,
    body        bytea       NOT NULL,
    seq         bigint      GENERATED ALWAYS AS IDENTITY
);

-- A stream's states in log order; its newest state is one probe.
CREATE INDEX IF NOT EXISTS immagent_states_stream ON immagent_states (kind, stream, seq);
CREATE INDEX IF NOT EXISTS immagent_states_parent ON immagent_states (parent_id);

-- Chain nodes (immagent/chains.py): a conversation's, a session branch's, a list channel's
-- links, each holding its elements' canonical bodies inline (larger ones stay assets, named
-- in `refs`) in one record (`body`, compressed per `codec`). A node is stored right after
-- its parent: `loc` is (run << 24) | its offset in its run, and a run continues until a
-- fork, so a lineage is one index range scan per run (git's packfiles make history walks
-- sequential the same way). The parent of a node is the node at loc - 1; a run's first
-- row names the node it continues from (`parent`, NULL for a chain's root) and its
-- `depth`, both NULL on every other row (free: in the null bitmap). `digest` is unique
-- through a hash index, as the assets'. `peaks` (every chains.SPAN-th depth) are the
-- accumulator's peaks after the node, kept so a writer need not read the history; `count`
-- is how many elements the node adds. Fixed-width columns first: no alignment padding.
CREATE TABLE IF NOT EXISTS immagent_nodes (
    loc         bigint      PRIMARY KEY,
    kind        smallint    NOT NULL,
    codec       smallint    NOT NULL DEFAULT 0,
    count       integer     NOT NULL,
    depth       integer,
    digest      bytea       NOT NULL CHECK (octet_length(digest) = 32),
    parent      bytea       CHECK (octet_length(parent) = 32),
    refs        bytea       CHECK (octet_length(refs) % 32 = 0),
    peaks       bytea       CHECK (octet_length(peaks) % 32 = 0),
    body        bytea       NOT NULL,
    CONSTRAINT immagent_nodes_digest EXCLUDE USING hash (digest WITH =)
);

-- Run numbers: a new run (a fork, a new chain) takes the next one.
CREATE SEQUENCE IF NOT EXISTS immagent_runs AS bigint;
