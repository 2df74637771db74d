//! `[store]` and its role sections: a store for every role.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::validator::Validator;
use super::ConfigError;

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStore {
    pub(crate) kind: Option<String>,
    pub(crate) path: Option<String>,
    pub(crate) synchronous: Option<String>,
    pub(crate) table: Option<String>,
    pub(crate) endpoint: Option<String>,
    pub(crate) url: Option<String>,
    pub(crate) schema: Option<String>,
    pub(crate) pool_size: Option<i64>,
    pub(crate) statement_timeout: Option<String>,
    pub(crate) migrate: Option<String>,
    pub(crate) ca_file: Option<String>,
    /// `kind = "redis"`: the prefix of its keys.
    pub(crate) prefix: Option<String>,
    /// `kind = "redis"`: whether `url` names a node of a Redis Cluster.
    pub(crate) cluster: Option<bool>,
    /// `kind = "redis"`: the `maxmemory-policy` other than `noeviction` the store opens under.
    pub(crate) accept_eviction: Option<String>,
    /// `kind = "redis"`: the replicas money writes wait for.
    pub(crate) wait_replicas: Option<i64>,
    /// `kind = "redis"`: how long money writes wait for them.
    pub(crate) wait_timeout: Option<String>,
    /// `[store.quota]`, `[store.usage]`, `[store.directory]`, `[store.idempotency]`,
    /// `[store.rate]`, `[store.places]`: a store of that role's own (only under `[store]`).
    pub(crate) quota: Option<Box<RawStore>>,
    pub(crate) usage: Option<Box<RawStore>>,
    pub(crate) directory: Option<Box<RawStore>>,
    pub(crate) idempotency: Option<Box<RawStore>>,
    /// `[store.rate]`: the store of tenants' shared rates (by default the quota role's).
    pub(crate) rate: Option<Box<RawStore>>,
    /// `[store.places]`: the store of tenants' places in flight (by default the quota role's).
    pub(crate) places: Option<Box<RawStore>>,
    /// `[store.alerts]`: the store of the alerts outbox (by default the usage role's).
    pub(crate) alerts: Option<Box<RawStore>>,
}

/// Where the engine keeps its counters, usage and tenant directory: the `[store]` section.
///
/// Without a `[store]` section, [`Builder::open`](crate::Builder::open) opens the embedded
/// durable default: SQLite in `tollgate.db` in the working directory.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreSettings {
    /// `kind = "memory"`: everything in the process's memory, lost when it stops.
    Memory,
    /// `kind = "sqlite"`: one SQLite file (cargo feature `sqlite`, on by default).
    Sqlite {
        /// The database file (`path`, default `tollgate.db`, relative to the working directory).
        path: std::path::PathBuf,
        /// When a committed write reaches the disk (`synchronous`, default `"full"`).
        synchronous: Synchronous,
    },
    /// `kind = "dynamodb"`: one DynamoDB table shared by a fleet (cargo feature `dynamodb`).
    Dynamodb {
        /// The table's name (`table`).
        table: String,
        /// An endpoint other than AWS's (`endpoint`), such as a local DynamoDB-compatible server.
        endpoint: Option<String>,
    },
    /// `kind = "postgres"`: one schema of a PostgreSQL database shared by a fleet (cargo
    /// feature `postgres`).
    Postgres(PostgresSettings),
    /// `kind = "redis"`: a Redis (or Valkey) server a fleet shares, for the quota, rate, places
    /// and idempotency roles only, beside a durable store for the others (cargo feature `redis`).
    Redis(RedisSettings),
}

/// The keys of `kind = "redis"`.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisSettings {
    /// The server's URL (`url`: `redis://` or `rediss://`, a user and password in it if any);
    /// without it, the `REDIS_URL` environment variable is read when the store opens. Never
    /// shown: it may hold a password.
    pub url: Option<String>,
    /// The prefix of every key the store writes or reads (`prefix`, default `tollgate`): keys
    /// outside it are never touched.
    pub prefix: String,
    /// Whether the server is a Redis Cluster, `url` one of its nodes (`cluster`, default
    /// false): the store follows its slots (`RedisStore::open_cluster`).
    pub cluster: bool,
    /// The `maxmemory-policy` other than `noeviction` the store opens under (`accept_eviction`,
    /// a policy's name; by default none: a server that evicts is refused at start, the
    /// refusal saying what it would evict). See [`RedisOptions::accept_eviction`](crate::store::RedisOptions::accept_eviction)
    /// for what each policy evicts.
    pub accept_eviction: Option<String>,
    /// The replicas each money write (a credit grant, a refund, a grant closed) waits for
    /// before it is answered (`wait_replicas`, default 0: the primary's acknowledgement alone);
    /// short of them within [`wait_timeout`](Self::wait_timeout), it fails (its webhook answers
    /// 500 and is delivered again). See [`RedisOptions::wait_for_replicas`](crate::store::RedisOptions::wait_for_replicas).
    pub wait_replicas: u32,
    /// How long a money write waits for its replicas (`wait_timeout`, default 1 s, below 5 s).
    pub wait_timeout: std::time::Duration,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("prefix", &self.prefix)
            .field("cluster", &self.cluster)
            .field("accept_eviction", &self.accept_eviction)
            .field("wait_replicas", &self.wait_replicas)
            .field("wait_timeout", &self.wait_timeout)
            .finish()
    }
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: None,
            prefix: "tollgate".to_owned(),
            cluster: false,
            accept_eviction: None,
            wait_replicas: 0,
            wait_timeout: std::time::Duration::from_secs(1),
        }
    }
}

impl RedisSettings {
    /// The roles a Redis store serves: what a fleet shares in the request path, and may lose
    /// at worst a second or two of in a server crash (docs/redis.md).
    pub const ROLES: [StoreRole; 4] = [StoreRole::Quota, StoreRole::Rate, StoreRole::Places, StoreRole::Idempotency];
}

/// The keys of `[store] kind = "postgres"`.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PostgresSettings {
    /// The connection URL (`url`); without it, the `DATABASE_URL` environment variable is read
    /// when the store opens. Never shown: it may hold a password.
    pub url: Option<String>,
    /// The schema holding tollgate's tables (`schema`, default `tollgate`).
    pub schema: String,
    /// The most connections of the pool (`pool_size`, default 16).
    pub pool_size: usize,
    /// How long one statement of a transaction may run (`SET LOCAL`; a call that is one
    /// statement is bounded by the engine's time limit), and how long a call waits for a
    /// connection (`statement_timeout`, default 5 s, at most 24 days).
    pub statement_timeout: std::time::Duration,
    /// Apply migrations at open, or only verify the schema (`migrate`, default `"auto"`).
    pub migrate: Migrate,
    /// Certificate authorities to trust besides the public ones (`ca_file`, a PEM file).
    pub ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("statement_timeout", &self.statement_timeout)
            .field("migrate", &self.migrate)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl Default for PostgresSettings {
    fn default() -> Self {
        Self {
            url: None,
            schema: "tollgate".to_owned(),
            pool_size: 16,
            statement_timeout: std::time::Duration::from_secs(5),
            migrate: Migrate::Auto,
            ca_file: None,
        }
    }
}

/// Whether a store applies its schema's migrations when it opens, or only checks that the
/// schema is the one it needs (`[store] migrate`, PostgreSQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Migrate {
    /// Creates the schema and applies missing migrations at open, under an advisory lock (the
    /// role owns the schema).
    #[default]
    Auto,
    /// Checks the version only, and refuses a schema that is missing or older: for a role of
    /// least privilege, with `tollgate migrate` run by the schema's owner.
    Verify,
}

impl StoreSettings {
    /// The kind as written in the file (`memory`, `sqlite`, `dynamodb`).
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            StoreSettings::Memory => "memory",
            StoreSettings::Sqlite { .. } => "sqlite",
            StoreSettings::Dynamodb { .. } => "dynamodb",
            StoreSettings::Postgres(_) => "postgres",
            StoreSettings::Redis(_) => "redis",
        }
    }

    /// Whether the nodes of a fleet share this store (DynamoDB, PostgreSQL), rather than each
    /// node having its own (memory, a SQLite file).
    #[must_use]
    pub fn is_shared(&self) -> bool {
        match self {
            StoreSettings::Memory | StoreSettings::Sqlite { .. } => false,
            StoreSettings::Dynamodb { .. } | StoreSettings::Postgres(_) | StoreSettings::Redis(_) => true,
        }
    }

    /// The cargo feature the kind needs, if any.
    #[must_use]
    pub fn feature(&self) -> Option<&'static str> {
        match self {
            StoreSettings::Memory => None,
            StoreSettings::Sqlite { .. } => Some("sqlite"),
            StoreSettings::Dynamodb { .. } => Some("dynamodb"),
            StoreSettings::Postgres(_) => Some("postgres"),
            StoreSettings::Redis(_) => Some("redis"),
        }
    }
}

impl std::fmt::Display for StoreSettings {
    /// `memory`, `sqlite at <path> (synchronous = full)`, `dynamodb table <table>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSettings::Memory => f.write_str("memory"),
            StoreSettings::Sqlite { path, synchronous } => {
                let sync = match synchronous {
                    Synchronous::Full => "full",
                    Synchronous::Normal => "normal",
                };
                write!(f, "sqlite at {} (synchronous = {sync})", path.display())
            }
            StoreSettings::Dynamodb { table, endpoint: None } => write!(f, "dynamodb table {table}"),
            StoreSettings::Dynamodb { table, endpoint: Some(e) } => write!(f, "dynamodb table {table} at {e}"),
            // The URL is never shown (it may hold a password).
            StoreSettings::Postgres(p) => write!(f, "postgres schema {}", p.schema),
            StoreSettings::Redis(r) if r.cluster => write!(f, "redis cluster, keys under {}", r.prefix),
            StoreSettings::Redis(r) => write!(f, "redis keys under {}", r.prefix),
        }
    }
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings::Sqlite { path: "tollgate.db".into(), synchronous: Synchronous::Full }
    }
}

/// SQLite's `synchronous` setting for the store's file (in WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Synchronous {
    /// `FULL`: every committed store call is on disk before it returns, through a power cut or
    /// an operating-system crash too. The default: store calls are off the request path and
    /// batched, so an fsync each is cheap.
    #[default]
    Full,
    /// `NORMAL`: a process crash (SIGKILL included) loses nothing committed; a power cut or an
    /// operating-system crash may lose the calls since the last checkpoint.
    Normal,
}

/// A role a store plays, as the configuration can name a store for it apart from `[store]`
/// (`[store.quota]`, `[store.usage]`, `[store.directory]`, `[store.idempotency]`,
/// `[store.rate]`, `[store.places]`, `[store.alerts]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreRole {
    /// Quota counters (`QuotaStore`).
    Quota,
    /// Usage, its export and the ledger of what was exported, which share writes (`UsageStore`,
    /// `ExportStore` and `LedgerStore`).
    Usage,
    /// The tenant directory (`DirectoryStore`).
    Directory,
    /// `Idempotency-Key` bindings (`IdempotencyStore`).
    Idempotency,
    /// Tenants' shared rates (`RateStore`, `rate_scope = "fleet"`); without a section of its
    /// own, the quota role's store.
    Rate,
    /// Tenants' places in flight (`PlaceStore`, `concurrency_scope = "fleet"`); without a
    /// section of its own, the quota role's store.
    Places,
    /// The alerts outbox (`OutboxStore`): durable, as usage is; without a section of its own,
    /// the usage role's store.
    Alerts,
}

impl StoreRole {
    /// Every role.
    pub const ALL: [StoreRole; 7] = [
        StoreRole::Quota,
        StoreRole::Usage,
        StoreRole::Directory,
        StoreRole::Idempotency,
        StoreRole::Rate,
        StoreRole::Places,
        StoreRole::Alerts,
    ];

    /// The role's name in the configuration (`[store.NAME]`).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            StoreRole::Quota => "quota",
            StoreRole::Usage => "usage",
            StoreRole::Directory => "directory",
            StoreRole::Idempotency => "idempotency",
            StoreRole::Rate => "rate",
            StoreRole::Places => "places",
            StoreRole::Alerts => "alerts",
        }
    }
}

/// The stores named for a role of their own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct StoreRoles {
    pub(crate) quota: Option<StoreSettings>,
    pub(crate) usage: Option<StoreSettings>,
    pub(crate) directory: Option<StoreSettings>,
    pub(crate) idempotency: Option<StoreSettings>,
    pub(crate) rate: Option<StoreSettings>,
    pub(crate) places: Option<StoreSettings>,
    pub(crate) alerts: Option<StoreSettings>,
}

impl StoreRoles {
    /// The store named for `role` in a section of its own.
    pub(crate) fn get(&self, role: StoreRole) -> Option<&StoreSettings> {
        match role {
            StoreRole::Quota => self.quota.as_ref(),
            StoreRole::Usage => self.usage.as_ref(),
            StoreRole::Directory => self.directory.as_ref(),
            StoreRole::Idempotency => self.idempotency.as_ref(),
            StoreRole::Rate => self.rate.as_ref(),
            StoreRole::Places => self.places.as_ref(),
            StoreRole::Alerts => self.alerts.as_ref(),
        }
    }

    /// The store of `role`: its own section's, else (the rate and places roles) the quota
    /// role's, (the alerts role) the usage role's, else `store`.
    pub(crate) fn of<'a>(&'a self, role: StoreRole, store: &'a StoreSettings) -> &'a StoreSettings {
        match role {
            StoreRole::Rate | StoreRole::Places => self.get(role).or(self.quota.as_ref()).unwrap_or(store),
            StoreRole::Alerts => self.get(role).or(self.usage.as_ref()).unwrap_or(store),
            _ => self.get(role).unwrap_or(store),
        }
    }
}

/// Where the `[store]` section and its keys stand in the file.
#[derive(Debug, Clone, Default)]
pub(crate) struct StoreOrigin {
    pub(crate) section: Option<(usize, usize)>,
    pub(crate) keys: BTreeMap<&'static str, (usize, usize)>,
}

impl Validator<'_, '_> {
    /// The `[store]` section and its role sections: a store for every role, and the stores of
    /// the roles that have one of their own.
    pub(super) fn stores(&self, raw: &RawStore) -> Result<(StoreSettings, StoreRoles), ConfigError> {
        let store = self.store(raw, "store")?;
        let role = |name: &str, r: &Option<Box<RawStore>>| -> Result<Option<StoreSettings>, ConfigError> {
            let Some(r) = r else { return Ok(None) };
            let at = format!("store.{name}");
            for (nested, set) in [
                ("quota", r.quota.is_some()),
                ("usage", r.usage.is_some()),
                ("directory", r.directory.is_some()),
                ("idempotency", r.idempotency.is_some()),
                ("rate", r.rate.is_some()),
                ("places", r.places.is_some()),
                ("alerts", r.alerts.is_some()),
            ] {
                if set {
                    return Err(self.invalid(
                        &format!("{at}.{nested}"),
                        "a role's store is named under [store], not under another role",
                    ));
                }
            }
            self.store(r, &at).map(Some)
        };
        let roles = StoreRoles {
            quota: role("quota", &raw.quota)?,
            usage: role("usage", &raw.usage)?,
            directory: role("directory", &raw.directory)?,
            idempotency: role("idempotency", &raw.idempotency)?,
            rate: role("rate", &raw.rate)?,
            places: role("places", &raw.places)?,
            alerts: role("alerts", &raw.alerts)?,
        };
        self.one_kind_of_sharing(&store, &roles)?;
        // Redis serves the roles a fleet shares in the request path; the others need a durable
        // store (billing reads them back), placed at the section that names Redis.
        for role in StoreRole::ALL {
            if matches!(roles.of(role, &store), StoreSettings::Redis(_)) && !RedisSettings::ROLES.contains(&role) {
                let at = if roles.get(role).is_some() {
                    format!("store.{}.kind", role.name())
                } else if matches!(role, StoreRole::Alerts) && roles.usage.is_some() {
                    "store.usage.kind".to_owned()
                } else {
                    "store.kind".to_owned()
                };
                return Err(self.invalid(
                    &at,
                    format!(
                        "the {} role cannot be kept on Redis: usage, exports, the ledger, the directory and the \
                         alerts outbox are what billing reads back, and need a durable store; Redis serves \
                         [store.quota], [store.rate], [store.places] and [store.idempotency] beside a durable \
                         store a fleet shares as [store] (PostgreSQL or DynamoDB): see docs/redis.md",
                        role.name(),
                    ),
                ));
            }
        }
        // A fleet rate or concurrency on SQLite is the processes sharing the file's: kept in
        // one process's memory beside it, each process would keep its own. The alerts outbox
        // is durable as usage is: in memory beside a durable usage store, a crash would lose
        // the alerts written.
        for (role, beside) in [
            (StoreRole::Rate, StoreRole::Quota),
            (StoreRole::Places, StoreRole::Quota),
            (StoreRole::Alerts, StoreRole::Usage),
        ] {
            if roles.get(role).is_some_and(|r| *r == StoreSettings::Memory)
                && *roles.of(beside, &store) != StoreSettings::Memory
            {
                return Err(self.invalid(
                    &format!("store.{}.kind", role.name()),
                    format!(
                        "the {} role's store is memory but the {} role's is {}: it would be each process's own \
                         (the processes sharing the file, or the nodes sharing the store, would each keep their \
                         own, and lose it in a crash); keep it on the {} role's store",
                        role.name(),
                        beside.name(),
                        roles.of(beside, &store).kind(),
                        beside.name()
                    ),
                ));
            }
        }
        Ok((store, roles))
    }

    /// Every role of a fleet is shared: a store the nodes share (DynamoDB) for one role and one
    /// node's own (memory, a SQLite file) for another is refused, at the role's section. With
    /// one node's quota store each node would count alone (the fleet admitting N times a hard
    /// limit); with one node's idempotency store a replay sent to another node would run again;
    /// with one node's directory a webhook's plan change would reach one node; with one node's
    /// usage store two nodes would export the same window.
    pub(super) fn one_kind_of_sharing(&self, store: &StoreSettings, roles: &StoreRoles) -> Result<(), ConfigError> {
        let of = |role: StoreRole| roles.of(role, store);
        let written = self.loc.find_exact("store.kind").is_some() || self.loc.find_exact("store.path").is_some();
        let section = |role: StoreRole| {
            if roles.get(role).is_some() {
                format!("[store.{}]", role.name())
            } else if matches!(role, StoreRole::Rate | StoreRole::Places) && roles.quota.is_some() {
                format!("[store.quota], the {} role's by default", role.name())
            } else if written {
                "[store]".to_owned()
            } else {
                "[store]'s default, a SQLite file tollgate.db".to_owned()
            }
        };
        let Some(shared) = StoreRole::ALL.into_iter().find(|r| of(*r).is_shared()) else { return Ok(()) };
        let Some(own) = StoreRole::ALL.into_iter().find(|r| !of(*r).is_shared()) else { return Ok(()) };
        // Placed at the role section involved: the node's own one if it has a section, else
        // the shared one (the node's own store then comes from `[store]`).
        let at = if roles.get(own).is_some() { own } else { shared };
        Err(self.invalid(
            &format!("store.{}.kind", at.name()),
            format!(
                "the {} role's store is {} (`{}`), shared by a fleet, but the {} role's is {} (`{}`), one node's own: \
                 every role of a fleet needs a shared store (with one node's store for a role, each node would keep \
                 its own {})",
                shared.name(),
                of(shared).kind(),
                section(shared),
                own.name(),
                of(own).kind(),
                section(own),
                match own {
                    StoreRole::Quota => "quota counts and the fleet would admit a hard limit once per node",
                    StoreRole::Idempotency => "idempotency keys and a replay sent to another node would run again",
                    StoreRole::Directory => "tenants and plans and a webhook's plan change would reach one node",
                    StoreRole::Usage => "usage and two nodes would export the same window",
                    StoreRole::Rate => "tenants' fleet rates and the fleet would admit a fleet rate once per node",
                    StoreRole::Places => {
                        "tenants' places in flight and the fleet would admit a fleet concurrency once per node"
                    }
                    StoreRole::Alerts => "alerts outbox and the fleet would send each alert once per node",
                }
            ),
        ))
    }

    /// A store section (`[store]`, or a role's under it, at `at`): a known kind, and only the
    /// keys of that kind.
    pub(super) fn store(&self, raw: &RawStore, at: &str) -> Result<StoreSettings, ConfigError> {
        let kind = raw.kind.as_deref().unwrap_or("sqlite");
        let only = |key: &str, set: bool, kinds: &str| {
            if set {
                Err(self
                    .invalid(&format!("{at}.{key}"), format!("`{key}` applies to kind = {kinds}, not to \"{kind}\"")))
            } else {
                Ok(())
            }
        };
        let text = |key: &str, value: &Option<String>| -> Result<Option<String>, ConfigError> {
            match value {
                Some(v) if v.trim().is_empty() => Err(self.invalid(&format!("{at}.{key}"), "must not be empty")),
                v => Ok(v.clone()),
            }
        };
        let redis_only = || {
            only("prefix", raw.prefix.is_some(), "\"redis\"")?;
            only("cluster", raw.cluster.is_some(), "\"redis\"")?;
            only("accept_eviction", raw.accept_eviction.is_some(), "\"redis\"")?;
            only("wait_replicas", raw.wait_replicas.is_some(), "\"redis\"")?;
            only("wait_timeout", raw.wait_timeout.is_some(), "\"redis\"")
        };
        let postgres_only = || {
            only("url", raw.url.is_some(), "\"postgres\" or \"redis\"")?;
            for (key, set) in [
                ("schema", raw.schema.is_some()),
                ("pool_size", raw.pool_size.is_some()),
                ("statement_timeout", raw.statement_timeout.is_some()),
                ("migrate", raw.migrate.is_some()),
                ("ca_file", raw.ca_file.is_some()),
            ] {
                only(key, set, "\"postgres\"")?;
            }
            Ok::<_, ConfigError>(())
        };
        match kind {
            "memory" => {
                only("path", raw.path.is_some(), "\"sqlite\"")?;
                only("synchronous", raw.synchronous.is_some(), "\"sqlite\"")?;
                only("table", raw.table.is_some(), "\"dynamodb\"")?;
                only("endpoint", raw.endpoint.is_some(), "\"dynamodb\"")?;
                postgres_only()?;
                redis_only()?;
                Ok(StoreSettings::Memory)
            }
            "sqlite" => {
                only("table", raw.table.is_some(), "\"dynamodb\"")?;
                only("endpoint", raw.endpoint.is_some(), "\"dynamodb\"")?;
                postgres_only()?;
                redis_only()?;
                let path = text("path", &raw.path)?.unwrap_or_else(|| "tollgate.db".to_owned());
                let synchronous = match raw.synchronous.as_deref() {
                    None | Some("full") => Synchronous::Full,
                    Some("normal") => Synchronous::Normal,
                    Some(_) => {
                        return Err(self.invalid(&format!("{at}.synchronous"), "expected \"full\" or \"normal\""))
                    }
                };
                Ok(StoreSettings::Sqlite { path: path.into(), synchronous })
            }
            "dynamodb" => {
                only("path", raw.path.is_some(), "\"sqlite\"")?;
                only("synchronous", raw.synchronous.is_some(), "\"sqlite\"")?;
                postgres_only()?;
                redis_only()?;
                let Some(table) = text("table", &raw.table)? else {
                    return Err(self.invalid(
                        &format!("{at}.table"),
                        "kind = \"dynamodb\" needs the table's name: table = \"...\"",
                    ));
                };
                Ok(StoreSettings::Dynamodb { table, endpoint: text("endpoint", &raw.endpoint)? })
            }
            "postgres" => {
                only("path", raw.path.is_some(), "\"sqlite\"")?;
                only("synchronous", raw.synchronous.is_some(), "\"sqlite\"")?;
                only("table", raw.table.is_some(), "\"dynamodb\"")?;
                only("endpoint", raw.endpoint.is_some(), "\"dynamodb\"")?;
                redis_only()?;
                let mut p = PostgresSettings { url: text("url", &raw.url)?, ..PostgresSettings::default() };
                if let Some(schema) = text("schema", &raw.schema)? {
                    let plain = schema.len() <= 63
                        && !schema.starts_with("pg_")
                        && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                        && schema.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                    if !plain {
                        return Err(self.invalid(
                            &format!("{at}.schema"),
                            "a schema name is lower-case letters, digits and `_`, starting with a letter or `_` \
                             (not `pg_`), at most 63 bytes",
                        ));
                    }
                    p.schema = schema;
                }
                if let Some(size) = raw.pool_size {
                    p.pool_size = usize::try_from(size)
                        .ok()
                        .filter(|s| (1..=1024).contains(s))
                        .ok_or_else(|| self.invalid(&format!("{at}.pool_size"), "expected 1 to 1024 connections"))?;
                }
                p.statement_timeout = self.duration(
                    &format!("{at}.statement_timeout"),
                    raw.statement_timeout.as_deref(),
                    p.statement_timeout,
                )?;
                // PostgreSQL's statement_timeout is an int of milliseconds.
                if p.statement_timeout.as_millis() > i32::MAX as u128 {
                    return Err(self.invalid(&format!("{at}.statement_timeout"), "at most 24 days"));
                }
                p.migrate = match raw.migrate.as_deref() {
                    None | Some("auto") => Migrate::Auto,
                    Some("verify") => Migrate::Verify,
                    Some(_) => return Err(self.invalid(&format!("{at}.migrate"), "expected \"auto\" or \"verify\"")),
                };
                p.ca_file = text("ca_file", &raw.ca_file)?.map(Into::into);
                Ok(StoreSettings::Postgres(p))
            }
            "redis" => {
                only("path", raw.path.is_some(), "\"sqlite\"")?;
                only("synchronous", raw.synchronous.is_some(), "\"sqlite\"")?;
                only("table", raw.table.is_some(), "\"dynamodb\"")?;
                only("endpoint", raw.endpoint.is_some(), "\"dynamodb\"")?;
                for (key, set) in [
                    ("schema", raw.schema.is_some()),
                    ("pool_size", raw.pool_size.is_some()),
                    ("statement_timeout", raw.statement_timeout.is_some()),
                    ("migrate", raw.migrate.is_some()),
                    ("ca_file", raw.ca_file.is_some()),
                ] {
                    only(key, set, "\"postgres\"")?;
                }
                let mut r = RedisSettings {
                    url: text("url", &raw.url)?,
                    cluster: raw.cluster.unwrap_or(false),
                    ..RedisSettings::default()
                };
                if let Some(prefix) = text("prefix", &raw.prefix)? {
                    // A hash tag in the prefix would put every key in one slot of a cluster.
                    if prefix.len() > 64 || prefix.contains(['{', '}']) || prefix.chars().any(char::is_whitespace) {
                        return Err(self.invalid(
                            &format!("{at}.prefix"),
                            "a key prefix is at most 64 bytes, without braces or spaces",
                        ));
                    }
                    r.prefix = prefix;
                }
                if let Some(policy) = text("accept_eviction", &raw.accept_eviction)? {
                    if let Some(why) = redis_policy_refused(&policy) {
                        return Err(self.invalid(&format!("{at}.accept_eviction"), why));
                    }
                    r.accept_eviction = Some(policy);
                }
                if let Some(n) = raw.wait_replicas {
                    r.wait_replicas = u32::try_from(n)
                        .ok()
                        .filter(|n| *n <= 16)
                        .ok_or_else(|| self.invalid(&format!("{at}.wait_replicas"), "expected 0 to 16 replicas"))?;
                }
                r.wait_timeout = self.duration(&format!("{at}.wait_timeout"), raw.wait_timeout.as_deref(), r.wait_timeout)?;
                // Below the connection's 5 s a command, which the wait runs within.
                if r.wait_timeout >= std::time::Duration::from_secs(5) {
                    return Err(self.invalid(&format!("{at}.wait_timeout"), "must be below 5s (a command's timeout)"));
                }
                Ok(StoreSettings::Redis(r))
            }
            other => Err(self.invalid(
                &format!("{at}.kind"),
                format!(
                    "unknown store kind `{other}`: expected \"sqlite\", \"memory\", \"dynamodb\", \"postgres\" or \"redis\""
                ),
            )),
        }
    }
}

/// The `maxmemory-policy` values a Redis server takes (https://redis.io/docs/latest/develop/reference/eviction/).
pub(crate) const EVICTION_POLICIES: [&str; 8] = [
    "noeviction",
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
];

/// Why `policy` cannot be accepted as `accept_eviction` (`None`: it can): an evicting
/// `maxmemory-policy`'s name.
pub(crate) fn redis_policy_refused(policy: &str) -> Option<String> {
    match policy {
        "noeviction" => Some("noeviction evicts nothing: there is nothing to accept".to_owned()),
        p if EVICTION_POLICIES.contains(&p) => None,
        p => Some(format!(
            "`{p}` is not a maxmemory-policy: expected one of {}",
            EVICTION_POLICIES[1..].iter().map(|p| format!("\"{p}\"")).collect::<Vec<_>>().join(", ")
        )),
    }
}
