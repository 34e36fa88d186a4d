-- sandbox-snapshots: the SQLite schema.
--
-- Applied on open by src/store/migrate.rs. Each "-- migration: N" section
-- runs once, in order, inside one transaction, and PRAGMA user_version
-- records the last section applied. Released sections are never edited; a
-- change is a new section at the end.
--
-- Conventions: ids are 16-byte UUID blobs; times are Unix milliseconds;
-- enumerations are lowercase text checked against their allowed values.

-- migration: 1

CREATE TABLE hosts (
    id             BLOB    NOT NULL PRIMARY KEY CHECK (length(id) = 16),
    address        TEXT    NOT NULL DEFAULT '',
    status         TEXT    NOT NULL
                   CHECK (status IN ('pending', 'online', 'unreachable', 'draining', 'offline')),
    last_heartbeat INTEGER,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
) STRICT;

CREATE TABLE sandboxes (
    id         BLOB    NOT NULL PRIMARY KEY CHECK (length(id) = 16),
    team_id    BLOB    NOT NULL CHECK (length(team_id) = 16),
    host_id    BLOB    REFERENCES hosts (id),
    status     TEXT    NOT NULL
               CHECK (status IN ('pending', 'starting', 'running', 'paused', 'snapshotting',
                                 'stopped', 'missing', 'error')),
    vcpus      INTEGER NOT NULL DEFAULT 0 CHECK (vcpus >= 0),
    memory_mb  INTEGER NOT NULL DEFAULT 0 CHECK (memory_mb >= 0),
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;

CREATE INDEX sandboxes_by_team ON sandboxes (team_id);
CREATE INDEX sandboxes_by_host ON sandboxes (host_id);

-- Lifecycle: creating -> ready -> deleting -> purged (SPEC 4a). Only ready
-- rows are visible. `replaces` is set on a creating row that will take over
-- the name of that (ready) template when it becomes ready: an overwrite.
CREATE TABLE templates (
    id                BLOB    NOT NULL PRIMARY KEY CHECK (length(id) = 16),
    team_id           BLOB    NOT NULL CHECK (length(team_id) = 16),
    name              TEXT    NOT NULL,
    type              TEXT    NOT NULL CHECK (type IN ('base', 'snapshot')),
    state             TEXT    NOT NULL CHECK (state IN ('creating', 'ready', 'deleting')),
    vcpus             INTEGER NOT NULL DEFAULT 0 CHECK (vcpus >= 0),
    memory_mb         INTEGER NOT NULL DEFAULT 0 CHECK (memory_mb >= 0),
    size_bytes        INTEGER NOT NULL DEFAULT 0 CHECK (size_bytes >= 0),
    source_sandbox_id BLOB,
    replaces          BLOB,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

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
-- (No index on the name alone: only creating a platform template asks
-- whether any team uses a name, and that rare admin call may scan. Every
-- index costs every create and delete a page write.)

-- Which hosts hold which template's files. present -> deleting -> purged
-- when the host confirms. A row whose template row is gone is a tombstone:
-- a (possibly half-written) key still to be deleted, which is why
-- template_id is not a foreign key.
CREATE TABLE placements (
    template_id  BLOB    NOT NULL CHECK (length(template_id) = 16),
    host_id      BLOB    NOT NULL REFERENCES hosts (id),
    team_id      BLOB    NOT NULL CHECK (length(team_id) = 16),
    state        TEXT    NOT NULL CHECK (state IN ('present', 'deleting')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    -- Not before this time (backoff, or the grace after an ambiguous create).
    next_attempt INTEGER NOT NULL DEFAULT 0,
    -- Claimed by an attempt in flight until this time; void after a restart.
    lease_until  INTEGER,
    last_error   TEXT,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (template_id, host_id)
) STRICT, WITHOUT ROWID;

-- The deletion queue. Per-host work (a host back online, the sweep) also
-- goes through it: queued rows are few, present ones are never scanned.
CREATE INDEX placements_due ON placements (next_attempt) WHERE state = 'deleting';

-- The operations journal: one row per multi-step operation in flight,
-- written in the same transaction as its first state change and deleted in
-- the same transaction as its last. A row found at start-up is an
-- interrupted operation. phase: 'started' (the host may be working on it),
-- 'resolving' (rolled back; the sandbox's real status is still to be asked
-- from its host).
CREATE TABLE operations (
    template_id   BLOB    NOT NULL PRIMARY KEY,
    kind          TEXT    NOT NULL CHECK (kind IN ('create')),
    phase         TEXT    NOT NULL CHECK (phase IN ('started', 'resolving')),
    team_id       BLOB    NOT NULL,
    template_name TEXT    NOT NULL,
    sandbox_id    BLOB    NOT NULL,
    host_id       BLOB    NOT NULL,
    prev_status   TEXT    NOT NULL,
    replaces      BLOB,
    actor_type    TEXT    NOT NULL,
    actor_id      TEXT,
    actor_name    TEXT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_attempt  INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- One operation per sandbox at a time.
CREATE UNIQUE INDEX operations_one_per_sandbox ON operations (sandbox_id);

CREATE TABLE audit_log (
    seq           INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    -- Random (v4): unique without an index to enforce it.
    id            BLOB    NOT NULL,
    team_id       BLOB    NOT NULL,
    actor_type    TEXT    NOT NULL,
    actor_id      TEXT,
    actor_name    TEXT,
    action        TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    resource_id   TEXT    NOT NULL,
    outcome       TEXT    NOT NULL CHECK (outcome IN ('success', 'failure')),
    error_code    TEXT,
    metadata      TEXT    NOT NULL DEFAULT '{}',
    created_at    INTEGER NOT NULL
) STRICT;

CREATE INDEX audit_log_by_team ON audit_log (team_id, seq);

-- migration: 2

-- Teams and their API keys, for the HTTP server. The platform team (the
-- all-zero id) owns the administrators' keys.
CREATE TABLE teams (
    id         BLOB    NOT NULL PRIMARY KEY CHECK (length(id) = 16),
    name       TEXT    NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;

INSERT INTO teams (id, name, created_at) VALUES (zeroblob(16), 'platform', 0);

-- A key is shown once when created; only the SHA-256 of its secret part is
-- stored. Keys are high-entropy random values, so a plain hash suffices.
CREATE TABLE api_keys (
    id          BLOB    NOT NULL PRIMARY KEY CHECK (length(id) = 16),
    team_id     BLOB    NOT NULL REFERENCES teams (id),
    name        TEXT    NOT NULL,
    secret_hash BLOB    NOT NULL CHECK (length(secret_hash) = 32),
    admin       INTEGER NOT NULL DEFAULT 0 CHECK (admin IN (0, 1)),
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
) STRICT;

CREATE INDEX api_keys_by_team ON api_keys (team_id);

-- migration: 3

-- Every journal entry has an id of its own (`op-…`), by which operators
-- list and resolve it; entries written before this migration get one here.
-- `next_attempt` of a 'started' entry is now the end of its driver's lease:
-- the worker leaves it alone until then (a create in flight is not due),
-- and a manager voids the leases when it opens the file.
ALTER TABLE operations ADD COLUMN id BLOB CHECK (id IS NULL OR length(id) = 16);
UPDATE operations SET id = randomblob(16) WHERE id IS NULL;
CREATE UNIQUE INDEX operations_by_id ON operations (id);

-- migration: 4

-- The manager process (instance, `inst-…`) that wrote a journal entry. One
-- process uses an SQLite file at a time (the file lock), so here it is a
-- record for operators; on PostgreSQL it is what replicas adopt by.
ALTER TABLE operations ADD COLUMN owner BLOB CHECK (owner IS NULL OR length(owner) = 16);

-- migration: 5

-- The token of the claim an attempt in flight holds on a queued deletion,
-- written with `lease_until`: a failure is recorded only by the attempt
-- that still holds the claim, so a late answer of a lapsed attempt cannot
-- end the lease of the next one.
ALTER TABLE placements ADD COLUMN claim BLOB CHECK (claim IS NULL OR length(claim) = 16);

-- migration: 6

-- Restore (SPEC §7). What produced a snapshot and what each host runs
-- (`HostInfo` as JSON; NULL: unknown). `host_info_at` is when the host was
-- last asked (NULL: not since it came online), so that it is asked once.
ALTER TABLE templates ADD COLUMN compat TEXT;
ALTER TABLE templates ADD COLUMN last_used_at INTEGER;
ALTER TABLE hosts ADD COLUMN host_info TEXT;
ALTER TABLE hosts ADD COLUMN host_info_at INTEGER;
-- The template a restored sandbox started from (its name as the caller
-- gave it: the template may be deleted later).
ALTER TABLE sandboxes ADD COLUMN template_id BLOB;
ALTER TABLE sandboxes ADD COLUMN template_name TEXT;

-- The restore journal: one row per restore in flight, written with the
-- sandbox row (`starting`) and deleted when the sandbox is `running` or
-- gone. A row found after its owner's lease is an interrupted restore.
CREATE TABLE restores (
    id            BLOB    NOT NULL PRIMARY KEY CHECK (length(id) = 16),
    sandbox_id    BLOB    NOT NULL UNIQUE CHECK (length(sandbox_id) = 16),
    team_id       BLOB    NOT NULL,
    template_id   BLOB    NOT NULL,
    template_name TEXT    NOT NULL,
    host_id       BLOB    NOT NULL,
    vcpus         INTEGER NOT NULL,
    memory_mb     INTEGER NOT NULL,
    timeout_sec   INTEGER NOT NULL,
    disk_size_mb  INTEGER NOT NULL,
    actor_type    TEXT    NOT NULL,
    actor_id      TEXT,
    actor_name    TEXT,
    owner         BLOB,
    attempts      INTEGER NOT NULL DEFAULT 0,
    -- A restore driven by its own task: the end of its lease; else backoff.
    next_attempt  INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- While a restore from a template is open, that template's files on that
-- host are not deleted (the deletion queue looks here).
CREATE INDEX restores_by_template ON restores (template_id, host_id);

-- Sandboxes to destroy on their host: a restore that failed ambiguously
-- (the VM may exist, and the caller was told it failed) or was
-- interrupted. Retried with backoff until the host confirms. A confirmed
-- row stays as `destroyed`, so that the id is never used again.
CREATE TABLE sandbox_destroys (
    sandbox_id   BLOB    NOT NULL PRIMARY KEY CHECK (length(sandbox_id) = 16),
    host_id      BLOB    NOT NULL,
    team_id      BLOB    NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('queued', 'destroyed')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt INTEGER NOT NULL DEFAULT 0,
    lease_until  INTEGER,
    claim        BLOB,
    last_error   TEXT,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE INDEX sandbox_destroys_due ON sandbox_destroys (next_attempt) WHERE state = 'queued';

-- migration: 7

-- Team quotas (SPEC §8): NULL is no limit. Checked in the transaction that
-- opens a create, so that concurrent creates never overshoot the count.
CREATE TABLE team_limits (
    team_id       BLOB    NOT NULL PRIMARY KEY CHECK (length(team_id) = 16),
    max_snapshots INTEGER CHECK (max_snapshots IS NULL OR max_snapshots >= 0),
    max_bytes     INTEGER CHECK (max_bytes IS NULL OR max_bytes >= 0),
    updated_at    INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- A limited team's usage is counted on each create: its snapshots that
-- are not being deleted, with their sizes, from the index alone.
CREATE INDEX templates_quota ON templates (team_id, size_bytes)
    WHERE type = 'snapshot' AND state <> 'deleting';

-- migration: 8

-- Retention (SPEC §8). A template's `expires_at` (NULL: never) is set by
-- its create: the create's own TTL, else its team's `default_ttl`. The
-- background worker deletes what a policy selects through the ordinary
-- delete; platform templates never.
ALTER TABLE templates ADD COLUMN expires_at INTEGER;

-- A team's retention policy, in seconds; NULL is off. A team without any
-- has no row.
CREATE TABLE team_retention (
    team_id               BLOB    NOT NULL PRIMARY KEY CHECK (length(team_id) = 16),
    default_ttl           INTEGER CHECK (default_ttl IS NULL OR default_ttl > 0),
    delete_unused_after   INTEGER CHECK (delete_unused_after IS NULL OR delete_unused_after > 0),
    keep_last_per_sandbox INTEGER CHECK (keep_last_per_sandbox IS NULL OR keep_last_per_sandbox > 0),
    updated_at            INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- What the sweep selects, each from an index of its own, so that a pass
-- reads only what is due: expired templates (few rows carry a TTL) ...
CREATE INDEX templates_expiry ON templates (expires_at)
    WHERE state = 'ready' AND expires_at IS NOT NULL;
-- ... a team's snapshots by when they were last used (or created) ...
CREATE INDEX templates_unused ON templates (team_id, coalesce(last_used_at, created_at))
    WHERE type = 'snapshot' AND state = 'ready';
-- ... and a team's snapshots of each source sandbox, newest first.
CREATE INDEX templates_by_source
    ON templates (team_id, source_sandbox_id, created_at DESC, id DESC)
    WHERE type = 'snapshot' AND state = 'ready';

-- migration: 9

-- Requests remembered for their idempotency key or because they run
-- asynchronously (SPEC §8), keyed by their journal entry's operation id.
-- Written in the transaction that opens the operation and given its
-- outcome (`result`, JSON) in the one that decides it; purged once
-- `expires_at` (24 h by default) has passed.
CREATE TABLE requests (
    id            BLOB    NOT NULL PRIMARY KEY CHECK (length(id) = 16),
    team_id       BLOB    NOT NULL CHECK (length(team_id) = 16),
    kind          TEXT    NOT NULL,
    idem_key      TEXT,
    fingerprint   TEXT    NOT NULL,
    respond_async INTEGER NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
    result        TEXT,
    created_at    INTEGER NOT NULL,
    finished_at   INTEGER,
    expires_at    INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE UNIQUE INDEX requests_key ON requests (team_id, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX requests_expiry ON requests (expires_at);

-- migration: 10

-- The deletion queue by host, for a worker that claims (and a wake-up that
-- looks for) a few rows per host: with a host back online after a long
-- outage, a claim reads its next batch, not the whole queue. Rows leased
-- to an attempt in flight get an index of their own: they are few, and
-- when the first of them lapses is all the worker's sleep needs of them.
CREATE INDEX placements_due_by_host ON placements (host_id, next_attempt)
    WHERE state = 'deleting';
CREATE INDEX placements_leased ON placements (host_id)
    WHERE state = 'deleting' AND lease_until IS NOT NULL;
