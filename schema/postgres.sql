-- sandbox-snapshots: the PostgreSQL schema (feature `postgres`).
--
-- Applied on open by src/store/postgres/migrate.rs. Each "-- migration: N"
-- section runs once, in order; all pending sections run in one transaction
-- that holds an advisory lock, so that replicas starting together migrate
-- once, and `schema_version` records each section applied. Released
-- sections are never edited; a change is a new section at the end.
--
-- Tables are created unqualified: they go into the first schema of the
-- connection's `search_path` (`options=-csearch_path%3D…` in the URL).
--
-- Conventions, as in schema.sql: ids are 16-byte UUIDs (BYTEA); times are
-- Unix milliseconds (BIGINT, always the time the library passes in, never
-- the database clock); enumerations are lowercase text checked against
-- their allowed values. Every invariant that must hold across replicas
-- (name uniqueness, one operation per sandbox) is a unique index here.

-- migration: 1

CREATE TABLE hosts (
    id             BYTEA   NOT NULL PRIMARY KEY CHECK (octet_length(id) = 16),
    address        TEXT    NOT NULL DEFAULT '',
    status         TEXT    NOT NULL
                   CHECK (status IN ('pending', 'online', 'unreachable', 'draining', 'offline')),
    last_heartbeat BIGINT,
    created_at     BIGINT  NOT NULL,
    updated_at     BIGINT  NOT NULL
);

CREATE TABLE sandboxes (
    id         BYTEA   NOT NULL PRIMARY KEY CHECK (octet_length(id) = 16),
    team_id    BYTEA   NOT NULL CHECK (octet_length(team_id) = 16),
    host_id    BYTEA   REFERENCES hosts (id),
    status     TEXT    NOT NULL
               CHECK (status IN ('pending', 'starting', 'running', 'paused', 'snapshotting',
                                 'stopped', 'missing', 'error')),
    vcpus      BIGINT  NOT NULL DEFAULT 0 CHECK (vcpus >= 0),
    memory_mb  BIGINT  NOT NULL DEFAULT 0 CHECK (memory_mb >= 0),
    created_at BIGINT  NOT NULL,
    updated_at BIGINT  NOT NULL
);

CREATE INDEX sandboxes_by_team ON sandboxes (team_id);
CREATE INDEX sandboxes_by_host ON sandboxes (host_id);

-- Lifecycle: creating -> ready -> deleting -> purged (SPEC 4a). Only ready
-- rows are visible. `replaces` is set on a creating row that will take over
-- the name of that (ready) template when it becomes ready: an overwrite.
CREATE TABLE templates (
    id                BYTEA   NOT NULL PRIMARY KEY CHECK (octet_length(id) = 16),
    team_id           BYTEA   NOT NULL CHECK (octet_length(team_id) = 16),
    name              TEXT    NOT NULL,
    type              TEXT    NOT NULL CHECK (type IN ('base', 'snapshot')),
    state             TEXT    NOT NULL CHECK (state IN ('creating', 'ready', 'deleting')),
    vcpus             BIGINT  NOT NULL DEFAULT 0 CHECK (vcpus >= 0),
    memory_mb         BIGINT  NOT NULL DEFAULT 0 CHECK (memory_mb >= 0),
    size_bytes        BIGINT  NOT NULL DEFAULT 0 CHECK (size_bytes >= 0),
    source_sandbox_id BYTEA,
    replaces          BYTEA,
    created_at        BIGINT  NOT NULL,
    updated_at        BIGINT  NOT NULL
);

-- A name belongs to at most one template per team, counting creates in
-- flight but not templates being deleted. A pending overwrite does not hold
-- the name itself (the template it replaces does) ...
CREATE UNIQUE INDEX templates_name_per_team
    ON templates (team_id, name) WHERE state <> 'deleting' AND replaces IS NULL;
-- ... and there is at most one pending overwrite per template.
CREATE UNIQUE INDEX templates_one_overwrite
    ON templates (replaces) WHERE replaces IS NOT NULL;
-- Listing: a team's visible templates, newest first.
CREATE INDEX templates_visible
    ON templates (team_id, created_at DESC, id DESC) WHERE state = 'ready';

-- Which hosts hold which template's files. present -> deleting -> purged
-- when the host confirms. A row whose template row is gone is a tombstone:
-- a (possibly half-written) key still to be deleted, which is why
-- template_id is not a foreign key. Nor is host_id, unlike in SQLite: a
-- foreign key makes every insert take a share lock on the host's row, and
-- many concurrent creates on one host then queue on that row's multixact
-- (the 64-create benchmark ran 10-25 % slower with it). Hosts are never
-- deleted, and every insert takes its host from a registered one (the
-- sandbox's host, a listed host) or checks it first.
CREATE TABLE placements (
    template_id  BYTEA   NOT NULL CHECK (octet_length(template_id) = 16),
    host_id      BYTEA   NOT NULL CHECK (octet_length(host_id) = 16),
    team_id      BYTEA   NOT NULL CHECK (octet_length(team_id) = 16),
    state        TEXT    NOT NULL CHECK (state IN ('present', 'deleting')),
    attempts     BIGINT  NOT NULL DEFAULT 0,
    -- Not before this time (backoff, or the grace after an ambiguous create).
    next_attempt BIGINT  NOT NULL DEFAULT 0,
    -- Claimed by an attempt in flight (of any replica) until this time,
    -- with this token: a failure is recorded only by the attempt that still
    -- holds the claim, so a late answer of a lapsed one cannot end the
    -- lease of the next claimer.
    lease_until  BIGINT,
    claim        BYTEA   CHECK (claim IS NULL OR octet_length(claim) = 16),
    last_error   TEXT,
    created_at   BIGINT  NOT NULL,
    updated_at   BIGINT  NOT NULL,
    PRIMARY KEY (template_id, host_id)
);

-- The deletion queue, which every replica's worker claims from.
CREATE INDEX placements_due ON placements (next_attempt) WHERE state = 'deleting';

-- The manager processes (replicas) sharing this database, each with a
-- heartbeat lease. A journal entry whose owner has no live lease here is
-- adopted by another replica.
CREATE TABLE instances (
    id          BYTEA   PRIMARY KEY CHECK (octet_length(id) = 16),
    lease_until BIGINT  NOT NULL,
    started_at  BIGINT  NOT NULL
);

-- The operations journal: one row per multi-step operation in flight,
-- written in the same transaction as its first state change and deleted in
-- the same transaction as its last. phase: 'started' (the host may be
-- working on it; `next_attempt` is the end of its driver's lease),
-- 'resolving' (rolled back; the sandbox's real status is still to be asked
-- from its host). `owner` is the instance driving it (NULL: nobody; any
-- replica adopts it).
CREATE TABLE operations (
    template_id   BYTEA   NOT NULL PRIMARY KEY,
    id            BYTEA   NOT NULL CHECK (octet_length(id) = 16),
    owner         BYTEA   CHECK (owner IS NULL OR octet_length(owner) = 16),
    kind          TEXT    NOT NULL CHECK (kind IN ('create')),
    phase         TEXT    NOT NULL CHECK (phase IN ('started', 'resolving')),
    team_id       BYTEA   NOT NULL,
    template_name TEXT    NOT NULL,
    sandbox_id    BYTEA   NOT NULL,
    host_id       BYTEA   NOT NULL,
    prev_status   TEXT    NOT NULL,
    replaces      BYTEA,
    actor_type    TEXT    NOT NULL,
    actor_id      TEXT,
    actor_name    TEXT,
    attempts      BIGINT  NOT NULL DEFAULT 0,
    next_attempt  BIGINT  NOT NULL DEFAULT 0,
    last_error    TEXT,
    created_at    BIGINT  NOT NULL,
    updated_at    BIGINT  NOT NULL
);

-- One operation per sandbox at a time.
CREATE UNIQUE INDEX operations_one_per_sandbox ON operations (sandbox_id);
-- Operators resolve an entry by its id.
CREATE UNIQUE INDEX operations_by_id ON operations (id);
-- A worker reads its own entries; adoption looks for other owners'.
CREATE INDEX operations_by_owner ON operations (owner);

CREATE TABLE audit_log (
    seq           BIGSERIAL PRIMARY KEY,
    -- Random (v4): unique without an index to enforce it.
    id            BYTEA   NOT NULL,
    team_id       BYTEA   NOT NULL,
    actor_type    TEXT    NOT NULL,
    actor_id      TEXT,
    actor_name    TEXT,
    action        TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    resource_id   TEXT    NOT NULL,
    outcome       TEXT    NOT NULL CHECK (outcome IN ('success', 'failure')),
    error_code    TEXT,
    -- JSON text, exactly as written (as in schema.sql).
    metadata      TEXT    NOT NULL DEFAULT '{}',
    created_at    BIGINT  NOT NULL
);

CREATE INDEX audit_log_by_team ON audit_log (team_id, seq);

-- Teams and their API keys, for the HTTP server. The platform team (the
-- all-zero id) owns the administrators' keys.
CREATE TABLE teams (
    id         BYTEA   NOT NULL PRIMARY KEY CHECK (octet_length(id) = 16),
    name       TEXT    NOT NULL,
    created_at BIGINT  NOT NULL
);

INSERT INTO teams (id, name, created_at) VALUES (decode(repeat('00', 16), 'hex'), 'platform', 0);

-- A key is shown once when created; only the SHA-256 of its secret part is
-- stored. Keys are high-entropy random values, so a plain hash suffices.
CREATE TABLE api_keys (
    id          BYTEA   NOT NULL PRIMARY KEY CHECK (octet_length(id) = 16),
    team_id     BYTEA   NOT NULL REFERENCES teams (id),
    name        TEXT    NOT NULL,
    secret_hash BYTEA   NOT NULL CHECK (octet_length(secret_hash) = 32),
    admin       BOOLEAN NOT NULL DEFAULT FALSE,
    created_at  BIGINT  NOT NULL,
    revoked_at  BIGINT
);

CREATE INDEX api_keys_by_team ON api_keys (team_id);

-- migration: 2

-- Restore (SPEC §7), as schema.sql's section 6. What produced a snapshot
-- and what each host runs (`HostInfo` as JSON text; NULL: unknown).
-- `host_info_at` is when the host was last asked (NULL: not since it came
-- online), so that it is asked once.
ALTER TABLE templates ADD COLUMN compat TEXT;
ALTER TABLE templates ADD COLUMN last_used_at BIGINT;
ALTER TABLE hosts ADD COLUMN host_info TEXT;
ALTER TABLE hosts ADD COLUMN host_info_at BIGINT;
-- The template a restored sandbox started from (its name as the caller
-- gave it: the template may be deleted later).
ALTER TABLE sandboxes ADD COLUMN template_id BYTEA
    CHECK (template_id IS NULL OR octet_length(template_id) = 16);
ALTER TABLE sandboxes ADD COLUMN template_name TEXT;

-- The restore journal: one row per restore in flight, written with the
-- sandbox row (`starting`) and deleted when the sandbox is `running` or
-- gone. `owner` is the instance driving it; a row whose owner's lease
-- ended is adopted by another replica (an interrupted restore).
CREATE TABLE restores (
    id            BYTEA   NOT NULL PRIMARY KEY CHECK (octet_length(id) = 16),
    sandbox_id    BYTEA   NOT NULL CHECK (octet_length(sandbox_id) = 16),
    team_id       BYTEA   NOT NULL CHECK (octet_length(team_id) = 16),
    template_id   BYTEA   NOT NULL CHECK (octet_length(template_id) = 16),
    template_name TEXT    NOT NULL,
    host_id       BYTEA   NOT NULL CHECK (octet_length(host_id) = 16),
    vcpus         BIGINT  NOT NULL,
    memory_mb     BIGINT  NOT NULL,
    timeout_sec   BIGINT  NOT NULL,
    disk_size_mb  BIGINT  NOT NULL,
    actor_type    TEXT    NOT NULL,
    actor_id      TEXT,
    actor_name    TEXT,
    owner         BYTEA   CHECK (owner IS NULL OR octet_length(owner) = 16),
    attempts      BIGINT  NOT NULL DEFAULT 0,
    -- A restore driven by its own task: the end of its lease; else backoff.
    next_attempt  BIGINT  NOT NULL DEFAULT 0,
    last_error    TEXT,
    created_at    BIGINT  NOT NULL,
    updated_at    BIGINT  NOT NULL
);

-- One restore per sandbox id (with the sandboxes key, what decides two
-- restores of one id on two replicas).
CREATE UNIQUE INDEX restores_one_per_sandbox ON restores (sandbox_id);
-- While a restore from a template is open, that template's files on that
-- host are not deleted (the deletion queue looks here).
CREATE INDEX restores_by_template ON restores (template_id, host_id);
-- A worker reads its own entries; adoption looks for other owners'.
CREATE INDEX restores_by_owner ON restores (owner);

-- Sandboxes to destroy on their host: a restore that failed ambiguously
-- (the VM may exist, and the caller was told it failed) or was
-- interrupted. Claimed by every replica's worker with leases, as the
-- deletion queue is, and retried with backoff until the host confirms. A
-- confirmed row stays as `destroyed`, so that the id is never used again.
CREATE TABLE sandbox_destroys (
    sandbox_id   BYTEA   NOT NULL PRIMARY KEY CHECK (octet_length(sandbox_id) = 16),
    host_id      BYTEA   NOT NULL CHECK (octet_length(host_id) = 16),
    team_id      BYTEA   NOT NULL CHECK (octet_length(team_id) = 16),
    state        TEXT    NOT NULL CHECK (state IN ('queued', 'destroyed')),
    attempts     BIGINT  NOT NULL DEFAULT 0,
    next_attempt BIGINT  NOT NULL DEFAULT 0,
    -- Claimed by an attempt in flight until this time, with this token
    -- (see placements).
    lease_until  BIGINT,
    claim        BYTEA   CHECK (claim IS NULL OR octet_length(claim) = 16),
    last_error   TEXT,
    created_at   BIGINT  NOT NULL,
    updated_at   BIGINT  NOT NULL
);

CREATE INDEX sandbox_destroys_due ON sandbox_destroys (next_attempt) WHERE state = 'queued';

-- migration: 3

-- Team quotas (SPEC §8): NULL is no limit. A create of a team with limits
-- locks its row, so that concurrent creates (on any replica) are counted
-- one after the other and never overshoot the count.
CREATE TABLE team_limits (
    team_id       BYTEA   NOT NULL PRIMARY KEY CHECK (length(team_id) = 16),
    max_snapshots BIGINT  CHECK (max_snapshots IS NULL OR max_snapshots >= 0),
    max_bytes     BIGINT  CHECK (max_bytes IS NULL OR max_bytes >= 0),
    updated_at    BIGINT  NOT NULL
);

-- A limited team's usage is counted on each create: its snapshots that
-- are not being deleted, with their sizes, from the index alone.
CREATE INDEX templates_quota ON templates (team_id, size_bytes)
    WHERE type = 'snapshot' AND state <> 'deleting';

-- migration: 4

-- Retention (SPEC §8), as schema.sql's section 8. A template's
-- `expires_at` (NULL: never) is set by its create: the create's own TTL,
-- else its team's `default_ttl`. Every replica's worker sweeps; each batch
-- locks what it selects (`FOR UPDATE SKIP LOCKED`) and checks it is still
-- ready, so that no template is deleted or audited twice.
ALTER TABLE templates ADD COLUMN expires_at BIGINT;

-- A team's retention policy, in seconds; NULL is off. A team without any
-- has no row.
CREATE TABLE team_retention (
    team_id               BYTEA   NOT NULL PRIMARY KEY CHECK (octet_length(team_id) = 16),
    default_ttl           BIGINT  CHECK (default_ttl IS NULL OR default_ttl > 0),
    delete_unused_after   BIGINT  CHECK (delete_unused_after IS NULL OR delete_unused_after > 0),
    keep_last_per_sandbox BIGINT  CHECK (keep_last_per_sandbox IS NULL OR keep_last_per_sandbox > 0),
    updated_at            BIGINT  NOT NULL
);

-- What the sweep selects, each from an index of its own (see schema.sql).
CREATE INDEX templates_expiry ON templates (expires_at)
    WHERE state = 'ready' AND expires_at IS NOT NULL;
CREATE INDEX templates_unused ON templates (team_id, (coalesce(last_used_at, created_at)))
    WHERE type = 'snapshot' AND state = 'ready';
CREATE INDEX templates_by_source
    ON templates (team_id, source_sandbox_id, created_at DESC, id DESC)
    WHERE type = 'snapshot' AND state = 'ready';

-- migration: 5

-- Requests remembered for their idempotency key or because they run
-- asynchronously (SPEC §8), keyed by their journal entry's operation id.
-- Written in the transaction that opens the operation and given its
-- outcome (`result`, JSON) in the one that decides it; purged once
-- `expires_at` (24 h by default) has passed.
CREATE TABLE requests (
    id            BYTEA   NOT NULL PRIMARY KEY CHECK (length(id) = 16),
    team_id       BYTEA   NOT NULL CHECK (length(team_id) = 16),
    kind          TEXT    NOT NULL,
    idem_key      TEXT,
    fingerprint   TEXT    NOT NULL,
    respond_async BOOLEAN NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
    result        TEXT,
    created_at    BIGINT  NOT NULL,
    finished_at   BIGINT,
    expires_at    BIGINT  NOT NULL
);

CREATE UNIQUE INDEX requests_key ON requests (team_id, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX requests_expiry ON requests (expires_at);

-- migration: 6

-- The deletion queue by host, for a worker that claims (and a wake-up that
-- looks for) a few rows per host: with a host back online after a long
-- outage, a claim reads its next batch, not the whole queue. Rows leased
-- to an attempt in flight get an index of their own: they are few, and
-- when the first of them lapses is all the worker's sleep needs of them.
CREATE INDEX placements_due_by_host ON placements (host_id, next_attempt)
    WHERE state = 'deleting';
CREATE INDEX placements_leased ON placements (host_id)
    WHERE state = 'deleting' AND lease_until IS NOT NULL;
