//! The stores themselves: `tollgate check` (with the identifier namespace), `migrate`,
//! `copy-directory`, `dynamodb create-table` and `init-namespace`, and `export --repair-ttl`.

use std::path::Path;

use tollgate::{
    config::{StoreRole, StoreSettings},
    Config,
};

use crate::util::{admin, load, Result};

pub(crate) async fn check(config: &Config) -> Result<()> {
    out!("configuration OK");
    out!("store: {}", config.store());
    for role in StoreRole::ALL {
        if config.store_of(role) != config.store() {
            out!("  {} role: {}", role.name(), config.store_of(role));
        }
    }
    let meters: Vec<&str> = config.meters().iter().map(|m| m.id().as_str()).collect();
    out!("meters ({}): {}", meters.len(), meters.join(", "));
    out!("plans ({}):", config.plans().len());
    for (id, plan) in config.plans() {
        let rate = plan.rate().map_or("no rate limit".to_owned(), |r| format!("{r}, burst {}", plan.burst()));
        let quotas: Vec<String> = plan
            .quotas()
            .iter()
            .map(|(m, q)| {
                format!(
                    "{} {} per {} ({})",
                    q.limit(),
                    m.as_str(),
                    q.period().name(),
                    format!("{:?}", q.mode()).to_lowercase()
                )
            })
            .collect();
        let quotas = if quotas.is_empty() { "no quota".to_owned() } else { quotas.join(", ") };
        let version = match (plan.version(), plan.is_current()) {
            (1, true) => String::new(),
            (v, true) => format!(" (version {v})"),
            (v, false) => format!(" (version {v}, kept for its tenants)"),
        };
        out!("  {id}{version}: {rate}; {quotas}");
    }
    out!("routes: {}", config.routes().len());
    out!("tenants in the file: {}", config.tenants().len());
    let u = config.usage();
    out!(
        "usage: window {}, flush every {}, on store error {:?}",
        humantime::format_duration(u.window),
        humantime::format_duration(u.flush_interval),
        u.on_store_error
    );
    out!("meter event identifier namespace: {}", namespace(config).await);
    redis_durability(config).await;
    stripe_access(config).await
}

/// For each Redis server the roles name, what it may lose or evict (read with `INFO`, which
/// managed services answer); an unreachable server is a warning.
#[cfg(feature = "redis")]
async fn redis_durability(config: &Config) {
    let mut seen = Vec::new();
    for role in StoreRole::ALL {
        let StoreSettings::Redis(r) = config.store_of(role) else { continue };
        let Some(url) = r.url.clone().or_else(|| std::env::var("REDIS_URL").ok()) else {
            out!("warning: [store.{}] is on Redis without `url`, and REDIS_URL is not set", role.name());
            continue;
        };
        if seen.contains(&url) {
            continue;
        }
        seen.push(url.clone());
        let mut options = tollgate::store::RedisOptions::new(std::time::Duration::from_secs(5)).cluster(r.cluster);
        options.accept_eviction.clone_from(&r.accept_eviction);
        let read = tollgate::store::RedisStore::durability(&url, &options).await;
        match read {
            Ok(warnings) if warnings.is_empty() => {
                out!("redis: appendonly on, maxmemory-policy noeviction (or not told)")
            }
            Ok(warnings) => warnings.iter().for_each(|w| out!("warning: {w}")),
            Err(e) => out!("warning: {e}"),
        }
    }
}

#[cfg(not(feature = "redis"))]
async fn redis_durability(_: &Config) {}

/// With `[stripe.credits]`, what the secret key may read of what it needs (Stripe cannot list
/// a key's permissions: one list call each): a read refused fails the check, naming it; an
/// unreachable Stripe is a warning.
#[cfg(feature = "stripe")]
async fn stripe_access(config: &Config) -> Result<()> {
    if config.stripe().is_none_or(|s| s.credits.is_none()) {
        return Ok(());
    }
    match tollgate::billing::check_stripe_access(config).await {
        Ok(access) if !access.refused.is_empty() => Err(format!(
            "the Stripe secret key cannot read what [stripe.credits] needs (payments that need it are answered 500 \
             until it can): {}",
            access.refused.join("; ")
        )
        .into()),
        Ok(access) => {
            match access.unreachable {
                Some(why) => out!("warning: Stripe could not be asked what the secret key may read: {why}"),
                None => out!("stripe: the secret key reads what [stripe.credits] needs"),
            }
            Ok(())
        }
        Err(e) => {
            out!("warning: [stripe.credits]: {e}");
            Ok(())
        }
    }
}

#[cfg(not(feature = "stripe"))]
async fn stripe_access(_: &Config) -> Result<()> {
    Ok(())
}

/// The usage store's identifier namespace, as `check` shows it: read without changing the
/// store (a SQLite file is neither made nor migrated by a check).
async fn namespace(config: &Config) -> String {
    #[cfg_attr(not(any(feature = "sqlite", feature = "dynamodb")), allow(unused_variables))]
    let shown = |ns: std::result::Result<Option<String>, tollgate::store::StoreError>| match ns {
        Ok(Some(ns)) if ns.is_empty() => "(empty: the store was made before namespaces)".to_owned(),
        Ok(Some(ns)) => ns,
        Ok(None) => "drawn when the store is created".to_owned(),
        Err(e) => format!("unreadable: {e}"),
    };
    match config.store_of(StoreRole::Usage) {
        StoreSettings::Memory => "drawn by each process (memory store)".to_owned(),
        #[cfg(feature = "sqlite")]
        StoreSettings::Sqlite { path, .. } => match tollgate::store::SqliteStore::read_identifier_namespace(path).await
        {
            Ok(None) => format!("drawn when {} is created", path.display()),
            other => shown(other),
        },
        #[cfg(feature = "dynamodb")]
        StoreSettings::Dynamodb { table, endpoint } => {
            use tollgate::store::ExportStore;
            let store = tollgate::store::DynamoStore::from_env(table.clone(), endpoint.as_deref()).await;
            shown(store.identifier_namespace().await.map(Some))
        }
        #[cfg(feature = "postgres")]
        StoreSettings::Postgres(p) => {
            use tollgate::store::ExportStore;
            // Verified, never migrated: a check changes nothing.
            let mut settings = p.clone();
            settings.migrate = tollgate::config::Migrate::Verify;
            match tollgate::store::PostgresStore::options_of(&settings) {
                Err(e) => format!("unreadable: {e}"),
                Ok(options) => match tollgate::store::PostgresStore::open(&options).await {
                    Ok(store) => shown(store.identifier_namespace().await.map(Some)),
                    Err(e) => format!("unreadable: {e}"),
                },
            }
        }
        other => format!("not read ({other})"),
    }
}

/// Creates or migrates the PostgreSQL schema of every role whose store is one.
pub(crate) async fn migrate(config: &Config) -> Result<()> {
    let mut schemas: Vec<&tollgate::config::PostgresSettings> = Vec::new();
    for role in StoreRole::ALL {
        if let StoreSettings::Postgres(p) = config.store_of(role) {
            if !schemas.contains(&p) {
                schemas.push(p);
            }
        }
    }
    if schemas.is_empty() {
        return Err(format!(
            "the configuration's store is {}, not PostgreSQL (a SQLite file migrates itself when opened)",
            config.store()
        )
        .into());
    }
    #[cfg(feature = "postgres")]
    for p in schemas {
        let options = tollgate::store::PostgresStore::options_of(p)?;
        match tollgate::store::PostgresStore::migrate(&options).await? {
            (from, to) if from == to => out!("schema `{}` is at version {to}: nothing to do", p.schema),
            (0, to) => out!("schema `{}` created at version {to}", p.schema),
            (from, to) => out!("schema `{}` migrated from version {from} to {to}", p.schema),
        }
    }
    #[cfg(feature = "postgres")]
    return Ok(());
    #[cfg(not(feature = "postgres"))]
    {
        let _ = schemas;
        Err("this build of tollgate has no PostgreSQL support (cargo feature `postgres`)".into())
    }
}

/// Copies the tenant directory of the configuration at `config` to the directory store of the
/// one at `to`.
pub(crate) async fn copy_directory(config: &Path, to: &Path) -> Result<()> {
    let from = admin(config).await?;
    let target = crate::util::open_admin(&load(to)?).await?;
    let report = from.copy_directory(target.directory_store().as_ref()).await?;
    out!("copied {} tenants and {} API keys to the directory of {}", report.tenants, report.keys, to.display());
    Ok(())
}

/// Creates the DynamoDB table of every role whose store is one (`[store]` and the roles' own).
pub(crate) async fn create_table(config: &Config) -> Result<()> {
    let mut tables: Vec<(&String, &Option<String>)> = Vec::new();
    for role in StoreRole::ALL {
        if let StoreSettings::Dynamodb { table, endpoint } = config.store_of(role) {
            if !tables.contains(&(table, endpoint)) {
                tables.push((table, endpoint));
            }
        }
    }
    if tables.is_empty() {
        return Err(format!("the configuration's store is {}, not a DynamoDB table", config.store()).into());
    }
    #[cfg(feature = "dynamodb")]
    for (table, endpoint) in tables {
        let store = tollgate::store::DynamoStore::from_env(table.clone(), endpoint.as_deref()).await;
        store.create_table().await?;
        out!("table `{table}` created (on-demand; indexes gsi1, gsi2; TTL on `ttl`)");
    }
    #[cfg(feature = "dynamodb")]
    return Ok(());
    #[cfg(not(feature = "dynamodb"))]
    {
        let _ = tables;
        Err("this build of tollgate has no DynamoDB support (cargo feature `dynamodb`)".into())
    }
}

/// Draws the identifier namespace of the usage role's DynamoDB table if it has none.
pub(crate) async fn init_namespace(config: &Config) -> Result<()> {
    let StoreSettings::Dynamodb { table, endpoint } = config.store_of(StoreRole::Usage) else {
        return Err(format!("the usage store is {}, not a DynamoDB table", config.store_of(StoreRole::Usage)).into());
    };
    #[cfg(feature = "dynamodb")]
    {
        let store = tollgate::store::DynamoStore::from_env(table.clone(), endpoint.as_deref()).await;
        store.check_table().await?;
        match store.init_identifier_namespace().await? {
            (true, ns) => out!("table `{table}`: identifier namespace {ns} drawn"),
            (false, ns) if ns.is_empty() => {
                return Err(format!("table `{table}` holds a namespace item without a value: mend or delete it").into())
            }
            (false, ns) => out!("table `{table}` has its identifier namespace: {ns}"),
        }
        Ok(())
    }
    #[cfg(not(feature = "dynamodb"))]
    {
        let _ = (table, endpoint);
        Err("this build of tollgate has no DynamoDB support (cargo feature `dynamodb`)".into())
    }
}

/// Mends the TTL of the dead letters in the usage role's DynamoDB table.
pub(crate) async fn repair_ttl_of(config: &Config) -> Result<()> {
    let StoreSettings::Dynamodb { table, endpoint } = config.store_of(StoreRole::Usage) else {
        return Err(format!(
            "--repair-ttl mends a DynamoDB table; the usage store is {}",
            config.store_of(StoreRole::Usage)
        )
        .into());
    };
    #[cfg(feature = "dynamodb")]
    {
        let store = tollgate::store::DynamoStore::from_env(table.clone(), endpoint.as_deref()).await;
        let mended = store.repair_dead_letter_ttl().await?;
        out!("{mended} dead letters in `{table}` given a TTL past any horizon (kept until requeued or confirmed)");
        Ok(())
    }
    #[cfg(not(feature = "dynamodb"))]
    {
        let _ = (table, endpoint);
        Err("this build of tollgate has no DynamoDB support (cargo feature `dynamodb`)".into())
    }
}
