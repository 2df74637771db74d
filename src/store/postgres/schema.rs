//! The schema of the PostgresStore: its tables, their migrations, and checking a schema.

use super::*;

/// The PostgreSQL schema version this build writes (`meta.schema_version`); a schema of a
/// newer version is refused.
pub const SCHEMA_VERSION: u32 = 17;

/// The schema, one step per version: step `i` takes a schema from version `i` to `i + 1`.
/// `{s}` is the schema's name. Text keys are compared byte by byte (`COLLATE "C"`), as Rust
/// compares them, so that pages follow the order of the other stores.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE {s}.meta (
    key   text COLLATE "C" PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE {s}.quota (
    tenant   text COLLATE "C" NOT NULL,
    meter    text COLLATE "C" NOT NULL,
    period   text COLLATE "C" NOT NULL,
    start_at bigint NOT NULL,
    end_at   bigint NOT NULL,
    reserved bigint NOT NULL,
    -- The units granted by the last call applied, and per sender (node) the last call's
    -- [seq, granted, reserved], the newest 64 kept: a re-sent token is answered, not applied.
    answer   bigint NOT NULL DEFAULT 0,
    senders  jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (tenant, meter, period, start_at, end_at)
);
CREATE INDEX quota_end ON {s}.quota (end_at);
CREATE TABLE {s}.quota_floor (
    tenant         text COLLATE "C" NOT NULL,
    meter          text COLLATE "C" NOT NULL,
    dropped_before bigint NOT NULL,
    PRIMARY KEY (tenant, meter)
);
CREATE TABLE {s}.usage (
    tenant           text COLLATE "C" NOT NULL,
    meter            text COLLATE "C" NOT NULL,
    window_start     bigint NOT NULL,
    quantity         bigint NOT NULL,
    exported         bigint NOT NULL DEFAULT 0,
    revision         bigint NOT NULL DEFAULT 0,
    in_flight        bigint,
    dead             text,
    attempts         bigint NOT NULL DEFAULT 0,
    first_attempt_at bigint,
    claim_node       bigint,
    claim_until      bigint,
    send             text,
    unknown_failures bigint NOT NULL DEFAULT 0,
    billable         boolean NOT NULL DEFAULT true,
    PRIMARY KEY (tenant, meter, window_start)
);
CREATE INDEX usage_pending ON {s}.usage (tenant, meter, window_start)
    WHERE dead IS NULL AND billable AND (quantity > exported OR in_flight IS NOT NULL);
CREATE INDEX usage_dead ON {s}.usage (tenant, meter, window_start) WHERE dead IS NOT NULL;
CREATE INDEX usage_window ON {s}.usage (window_start);
CREATE TABLE {s}.flush (
    id      text COLLATE "C" PRIMARY KEY,
    seen_at bigint NOT NULL
);
CREATE INDEX flush_seen ON {s}.flush (seen_at);
CREATE TABLE {s}.usage_event (
    id      text COLLATE "C" PRIMARY KEY,
    seen_at bigint NOT NULL
);
CREATE INDEX usage_event_seen ON {s}.usage_event (seen_at);
CREATE TABLE {s}.webhook_event (
    id      text COLLATE "C" PRIMARY KEY,
    seen_at bigint NOT NULL
);
CREATE INDEX webhook_event_seen ON {s}.webhook_event (seen_at);
-- How many ids each of the two tables above holds (at least): the cap is checked on it.
CREATE TABLE {s}.id_count (
    kind text COLLATE "C" PRIMARY KEY,
    n    bigint NOT NULL
);
INSERT INTO {s}.id_count (kind, n) VALUES ('usage_event', 0), ('webhook_event', 0);
CREATE TABLE {s}.tenant (
    id            text COLLATE "C" PRIMARY KEY,
    plan          text NOT NULL,
    customer      text COLLATE "C" UNIQUE,
    last_event_at bigint,
    overrides     text,
    subscriptions text
);
CREATE TABLE {s}.api_key (
    hash       bytea PRIMARY KEY,
    tenant     text COLLATE "C" NOT NULL,
    prefix     text NOT NULL DEFAULT '',
    created_at bigint NOT NULL DEFAULT 0,
    expires_at bigint
);
CREATE INDEX api_key_tenant ON {s}.api_key (tenant);
CREATE TABLE {s}.idempotency (
    idem_key        text COLLATE "C" PRIMARY KEY,
    request         text NOT NULL,
    owner           bigint NOT NULL,
    completed       boolean NOT NULL,
    in_flight_until bigint NOT NULL,
    expires_at      bigint NOT NULL,
    response        bytea
);
CREATE INDEX idempotency_expires ON {s}.idempotency (expires_at);
CREATE TABLE {s}.idempotency_bytes (
    bucket bigint PRIMARY KEY,
    bytes  bigint NOT NULL
);
CREATE TABLE {s}.ledger (
    hour          bigint NOT NULL,
    tenant        text COLLATE "C" NOT NULL,
    meter         text COLLATE "C" NOT NULL,
    window_start  bigint NOT NULL,
    revision      bigint NOT NULL,
    send          text NOT NULL,
    exported_at   bigint,
    lacking_since bigint,
    superseded    boolean NOT NULL DEFAULT false,
    kept_from     bigint NOT NULL,
    PRIMARY KEY (hour, tenant, meter, window_start, revision)
);
CREATE INDEX ledger_kept ON {s}.ledger (kept_from);
"#,
    // Each tenant's Metronome customer id or ingest alias, beside its Stripe customer.
    r#"
ALTER TABLE {s}.tenant ADD COLUMN metronome_customer text;
"#,
    // Prepaid credits: a prepaid counter's granted units (its limit) beside its reserved
    // count, and the grants, open and recently closed.
    r#"
ALTER TABLE {s}.quota ADD COLUMN granted bigint;
CREATE TABLE {s}.credit (
    tenant     text COLLATE "C" NOT NULL,
    meter      text COLLATE "C" NOT NULL,
    id         text COLLATE "C" NOT NULL,
    units      bigint NOT NULL,
    granted_at bigint NOT NULL,
    expires_at bigint,
    payment    text,
    refunded   bigint NOT NULL DEFAULT 0,
    closed_at  bigint,
    revoked    boolean,
    lost       bigint,
    PRIMARY KEY (tenant, meter, id)
);
CREATE INDEX credit_due ON {s}.credit (expires_at) WHERE closed_at IS NULL AND expires_at IS NOT NULL;
"#,
    // Senders carry the time of their last call as a fourth element (none: written by an
    // earlier build, the oldest); a prepaid balance's forgiven units (per sender); a grant's cost, units
    // bought and units its refunds took back; one grant per payment (duplicates made before
    // are kept, marked); refunds kept until their grant lands. Every new column has a default,
    // so nodes of the previous version keep writing valid rows during an upgrade.
    r#"
ALTER TABLE {s}.quota ADD COLUMN forgiven bigint NOT NULL DEFAULT 0;
ALTER TABLE {s}.quota ADD COLUMN forgiven_until bigint NOT NULL DEFAULT 0;
ALTER TABLE {s}.quota ADD COLUMN forgiven_by jsonb NOT NULL DEFAULT '{}';
ALTER TABLE {s}.quota ADD COLUMN senders_forgotten_at bigint NOT NULL DEFAULT 0;
ALTER TABLE {s}.credit ADD COLUMN paid bigint;
ALTER TABLE {s}.credit ADD COLUMN bought bigint;
UPDATE {s}.credit SET bought = units;
ALTER TABLE {s}.credit ADD COLUMN taken bigint NOT NULL DEFAULT 0;
ALTER TABLE {s}.credit ADD COLUMN duplicate boolean NOT NULL DEFAULT false;
UPDATE {s}.credit c SET duplicate = true WHERE c.payment IS NOT NULL AND EXISTS (
    SELECT 1 FROM {s}.credit o WHERE o.tenant = c.tenant AND o.payment = c.payment
    AND (o.granted_at, o.meter, o.id) < (c.granted_at, c.meter, c.id));
CREATE UNIQUE INDEX credit_payment ON {s}.credit (tenant, payment) WHERE payment IS NOT NULL AND NOT duplicate;
CREATE INDEX credit_by_payment ON {s}.credit (payment) WHERE payment IS NOT NULL;
CREATE INDEX credit_id ON {s}.credit (id);
CREATE TABLE {s}.credit_refund_kept (
    payment text COLLATE "C" PRIMARY KEY,
    invoice text COLLATE "C",
    refund  text NOT NULL,
    at      bigint NOT NULL
);
CREATE INDEX credit_refund_kept_invoice ON {s}.credit_refund_kept (invoice) WHERE invoice IS NOT NULL;
CREATE INDEX credit_refund_kept_at ON {s}.credit_refund_kept (at);
CREATE TABLE {s}.idempotency_count (
    shard integer PRIMARY KEY,
    n     bigint NOT NULL
);
INSERT INTO {s}.idempotency_count (shard, n) SELECT g, 0 FROM generate_series(0, 15) g;
UPDATE {s}.idempotency_count c SET n = k.n
    FROM (SELECT hashtext(idem_key) & 15 AS shard, count(*) AS n FROM {s}.idempotency GROUP BY 1) k
    WHERE c.shard = k.shard;
CREATE TABLE {s}.idempotency_shard_bytes (
    bucket bigint NOT NULL,
    shard  integer NOT NULL,
    bytes  bigint NOT NULL,
    PRIMARY KEY (bucket, shard)
);
"#,
    // 4 -> 5: tenants' shared rates (the rate role).
    r#"
CREATE TABLE {s}.rate_cells (
    tenant  text COLLATE "C" PRIMARY KEY,
    tat     bigint NOT NULL,
    senders text NOT NULL
);
CREATE INDEX rate_cells_tat ON {s}.rate_cells (tat);
"#,
    // 5 -> 6: tenants' places (the places role).
    r#"
CREATE TABLE {s}.place_leases (
    tenant  text COLLATE "C" PRIMARY KEY,
    holders text NOT NULL,
    expires bigint NOT NULL
);
"#,
    // 6 -> 7: the alerts outbox (the alerts role), and a tenant's own alert endpoint.
    r#"
CREATE TABLE {s}.alert_outbox (
    id           text COLLATE "C" NOT NULL,
    destination  text COLLATE "C" NOT NULL,
    tenant       text NOT NULL,
    event        text NOT NULL,
    body         text NOT NULL,
    created_at   bigint NOT NULL,
    keep_until   bigint NOT NULL,
    state        text NOT NULL,
    attempts     bigint NOT NULL,
    next_at      bigint NOT NULL,
    claim_owner  bigint NOT NULL,
    claim_until  bigint NOT NULL,
    last_error   text,
    delivered_at bigint,
    PRIMARY KEY (id, destination)
);
CREATE INDEX alert_outbox_due ON {s}.alert_outbox (next_at) WHERE state = 'pending';
CREATE INDEX alert_outbox_kept ON {s}.alert_outbox (keep_until) WHERE state <> 'pending';
ALTER TABLE {s}.tenant ADD COLUMN alert_endpoint text;
"#,
    // 7 -> 8: a tenant's own cap on a meter (its spend cap), beside the meter's counters.
    r#"
CREATE TABLE {s}.quota_cap (
    tenant text COLLATE "C" NOT NULL,
    meter  text COLLATE "C" NOT NULL,
    cap    bigint NOT NULL,
    hard   boolean NOT NULL,
    PRIMARY KEY (tenant, meter)
);
"#,
    // 8 -> 9: each sender's entry grows what it keeps of the counter (`[…, lease, held, jobs,
    // expires_at, gone]`, `store::quota::Keeping`); the counter keeps the least expiry of the
    // reservations it holds (a bound: NULL, none) and whether its last answer was to a sender
    // whose reservation had expired. Entries of earlier builds keep nothing and never expire.
    r#"
ALTER TABLE {s}.quota ADD COLUMN next_expiry bigint;
ALTER TABLE {s}.quota ADD COLUMN answer_expired boolean NOT NULL DEFAULT false;
"#,
    // 9 -> 10: a credit grant's takes apart from its payment's refunds (disputes, proration
    // credits), once per id (`store::quota::takes_json`); none by default.
    r#"
ALTER TABLE {s}.credit ADD COLUMN takes text NOT NULL DEFAULT '[]';
"#,
    // 10 -> 11: a tenant's recharge of a prepaid meter, beside its balance
    // (`store::RechargeState`, as JSON).
    r#"
CREATE TABLE {s}.quota_recharge (
    tenant text COLLATE "C" NOT NULL,
    meter  text COLLATE "C" NOT NULL,
    state  text NOT NULL,
    PRIMARY KEY (tenant, meter)
);
"#,
    // 11 -> 12: an API key's scopes (`KeyScopes::bits`); NULL, a key of an earlier build, has
    // the default scopes.
    r#"
ALTER TABLE {s}.api_key ADD COLUMN scopes bigint;
"#,
    // 12 -> 13: the values of a meter's open dimension a tenant used in a month
    // (`store::ValueRow`, as JSON), kept until `expires` (Unix seconds).
    r#"
CREATE TABLE {s}.dimension_values (
    tenant    text COLLATE "C" NOT NULL,
    meter     text COLLATE "C" NOT NULL,
    dimension text COLLATE "C" NOT NULL,
    period    bigint NOT NULL,
    row       text NOT NULL,
    expires   bigint NOT NULL,
    PRIMARY KEY (tenant, meter, dimension, period)
);
CREATE INDEX dimension_values_expires ON {s}.dimension_values (expires);
"#,
    // 13 -> 14: the feed of tenants changed (`store::Changes`): each tenant's last change, at
    // most `CHANGES_KEPT`; the row of the empty tenant id holds the feed's floor in `stamp`,
    // and is locked by every tell, which so apply one at a time.
    r#"
CREATE TABLE {s}.tenant_change (
    tenant text COLLATE "C" PRIMARY KEY,
    at     bigint NOT NULL,
    stamp  bigint NOT NULL
);
INSERT INTO {s}.tenant_change (tenant, at, stamp) VALUES ('', 0, 0);
"#,
    // 14 -> 15: each tenant's payments (`store::PaymentRow`, as JSON): what it has paid, net,
    // and since when, for tiers. Changed under its row's lock.
    r#"
CREATE TABLE {s}.tenant_payment (
    tenant text COLLATE "C" PRIMARY KEY,
    row    text NOT NULL
);
"#,
    // 15 -> 16: the audit of tenants' settings (`store::AuditRecord`): each tenant's records
    // numbered by its `audit_head` row (an upsert under the row's lock), at most
    // `AUDIT_PER_TENANT` kept per tenant of those it made itself (`own`) and of the others'.
    r#"
CREATE TABLE {s}.audit_head (
    tenant text COLLATE "C" PRIMARY KEY,
    seq    bigint NOT NULL
);
CREATE TABLE {s}.audit_log (
    tenant  text COLLATE "C" NOT NULL,
    seq     bigint NOT NULL,
    at      bigint NOT NULL,
    actor   text NOT NULL,
    setting text NOT NULL,
    before  text,
    after   text,
    own     boolean NOT NULL,
    PRIMARY KEY (tenant, seq)
);
CREATE INDEX audit_log_at ON {s}.audit_log (at, tenant, seq);
CREATE INDEX audit_log_own ON {s}.audit_log (tenant, own, seq);
"#,
    // 16 -> 17: the tallies of requests admitted and refused (`store::Tally`): the fleet's per
    // minute (`tenant` = ''), each tenant's per day, each outcome's count; kept
    // `TALLY_KEPT_SECS`.
    r#"
CREATE TABLE {s}.tally (
    start   bigint NOT NULL,
    tenant  text COLLATE "C" NOT NULL,
    outcome text COLLATE "C" NOT NULL,
    n       bigint NOT NULL,
    PRIMARY KEY (start, tenant, outcome)
);
CREATE INDEX tally_tenant ON {s}.tally (tenant, start);
"#,
];

/// How long a migration step waits for a table lock at a time.
const DDL_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(100);
/// How long a migration keeps trying to take its table locks.
const DDL_LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);

/// What a schema holds, as read.
enum Found {
    /// No schema, or an empty one.
    Nothing,
    /// A tollgate schema of this version.
    Version(u32),
}

impl PostgresStore {
    /// Reads the schema's version, refusing a schema that holds tables but not tollgate's.
    async fn found(&self, tx: &deadpool_postgres::Transaction<'_>) -> Pg<Found> {
        let schema = self.inner.schema.as_str();
        let tables: i64 = tx
            .query_typed_one("SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = $1", args![schema])
            .await?
            .get(0);
        if tables == 0 {
            return Ok(Found::Nothing);
        }
        let has_meta: bool = tx
            .query_typed_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = $1 AND tablename = 'meta')",
                args![schema],
            )
            .await?
            .get(0);
        let version = if has_meta {
            tx.query_typed_opt(&self.sql("SELECT value FROM {s}.meta WHERE key = 'schema_version'"), &[])
                .await?
                .and_then(|r| r.get::<_, String>(0).parse::<u32>().ok())
        } else {
            None
        };
        let Some(version) = version else {
            return Err(Fail::Store(StoreError::Unusable(format!(
                "schema `{schema}` holds tables that are not tollgate's: name another schema ([store] schema)"
            ))));
        };
        if version > SCHEMA_VERSION {
            return Err(Fail::Store(StoreError::Unusable(format!(
                "schema `{schema}` was written by a newer tollgate (schema version {version}; this build knows up \
                 to {SCHEMA_VERSION}): upgrade tollgate"
            ))));
        }
        Ok(Found::Version(version))
    }

    /// Brings the schema to [`SCHEMA_VERSION`] in one transaction under an advisory lock, so
    /// that nodes starting at once apply each step once.
    ///
    /// A step that alters a table waits for its lock at most [`DDL_LOCK_TIMEOUT`] at a time
    /// (`lock_timeout`): while it waits, the running nodes' writes on that table queue behind
    /// it, so it gives up, lets them through, and tries again after a pause (doubling up to
    /// five seconds), for at most [`DDL_LOCK_PATIENCE`].
    pub(super) async fn apply_migrations(&self) -> Result<(u32, u32), StoreError> {
        let started = tokio::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(100);
        loop {
            let locked = std::sync::atomic::AtomicBool::new(false);
            match self.migrate_once(&locked).await {
                Err(_)
                    if locked.load(std::sync::atomic::Ordering::Relaxed) && started.elapsed() < DDL_LOCK_PATIENCE =>
                {
                    tracing::info!(schema = %self.inner.schema, ?pause,
                        "the migration waits for a table lock a long transaction holds; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(5));
                }
                Err(_) if locked.load(std::sync::atomic::Ordering::Relaxed) => {
                    return Err(StoreError::Unusable(format!(
                        "the migration of schema `{}` could not take its table locks within {} s: a long transaction \
                         holds them; try again (nothing was changed)",
                        self.inner.schema,
                        DDL_LOCK_PATIENCE.as_secs()
                    )))
                }
                other => return other,
            }
        }
    }

    /// One attempt of [`apply_migrations`](Self::apply_migrations); `locked` is set when a step
    /// gave up waiting for a table lock.
    async fn migrate_once(&self, locked: &std::sync::atomic::AtomicBool) -> Result<(u32, u32), StoreError> {
        self.retrying(|| async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            tx.query_typed(
                "SELECT pg_advisory_xact_lock(hashtext('tollgate-migrate:' || $1))",
                args![self.inner.schema.as_str()],
            )
            .await?;
            let from = match self.found(&tx).await? {
                Found::Nothing => 0,
                Found::Version(v) => v,
            };
            if from == SCHEMA_VERSION {
                return Ok((from, from));
            }
            // Made only when missing: `CREATE SCHEMA IF NOT EXISTS` needs the database's CREATE
            // privilege even when the schema is there, which an owner given the schema by an
            // administrator (`CREATE SCHEMA … AUTHORIZATION`) does not have.
            let exists: bool = tx
                .query_typed_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1)",
                    args![self.inner.schema.as_str()],
                )
                .await?
                .get(0);
            if !exists {
                tx.batch_execute(&self.sql("CREATE SCHEMA {s}")).await?;
            }
            // Table locks are waited for a moment at a time: the running fleet's writes queue
            // behind a waiting `ALTER TABLE`.
            tx.batch_execute(&format!("SET LOCAL lock_timeout = '{}ms'", DDL_LOCK_TIMEOUT.as_millis())).await?;
            for step in &MIGRATIONS[from as usize..] {
                if let Err(e) = tx.batch_execute(&self.sql(step)).await {
                    if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
                        locked.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    return Err(e.into());
                }
            }
            if from == 0 {
                // A new schema draws its meter event identifier namespace.
                tx.query_typed(
                    &self.sql("INSERT INTO {s}.meta (key, value) VALUES ('namespace', $1)"),
                    args![crate::store::draw_namespace()],
                )
                .await?;
            }
            tx.query_typed(
                &self.sql(
                    "INSERT INTO {s}.meta (key, value) VALUES ('schema_version', $1) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                ),
                args![SCHEMA_VERSION.to_string()],
            )
            .await?;
            if (1..4).contains(&from) {
                // Grants of one payment made twice before one grant per payment was enforced:
                // kept as they were (their units may be spent), marked, and named for a person.
                let dups = tx
                    .query_typed(
                        &self.sql("SELECT tenant, meter, id, payment FROM {s}.credit WHERE duplicate LIMIT 100"),
                        &[],
                    )
                    .await?;
                for row in dups {
                    let (tenant, meter, id, payment): (String, String, String, String) =
                        (row.get(0), row.get(1), row.get(2), row.get(3));
                    tracing::warn!(schema = %self.inner.schema, %tenant, %meter, grant = %id, %payment,
                        "a second credit grant of one payment, made before one grant per payment was enforced: kept, \
                         marked duplicate (tollgate credits list); revoke it if it was not paid for twice");
                }
            }
            tx.commit().await?;
            tracing::info!(schema = %self.inner.schema, from, to = SCHEMA_VERSION, "PostgreSQL schema migrated");
            Ok((from, SCHEMA_VERSION))
        })
        .await
    }

    /// Checks that the schema is this build's, changing nothing.
    pub(super) async fn verify_schema(&self) -> Result<(), StoreError> {
        self.retrying(|| async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let found = self.found(&tx).await?;
            tx.commit().await?;
            let schema = &self.inner.schema;
            match found {
                Found::Version(SCHEMA_VERSION) => Ok(()),
                Found::Nothing => Err(Fail::Store(StoreError::Unusable(format!(
                    "schema `{schema}` has no tollgate tables and [store] migrate = \"verify\": run `tollgate migrate` \
                     as the schema's owner"
                )))),
                Found::Version(v) => Err(Fail::Store(StoreError::Unusable(format!(
                    "schema `{schema}` is at version {v}, this build needs {SCHEMA_VERSION}, and [store] migrate = \
                     \"verify\": run `tollgate migrate` as the schema's owner"
                )))),
            }
        })
        .await
    }
}
