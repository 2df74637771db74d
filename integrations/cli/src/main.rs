//! The `tollgate` command: checks a configuration, creates the DynamoDB table or the PostgreSQL
//! schema, administers the tenant directory (tenants, plans, API keys) and reads usage, on
//! whichever store the configuration names (`[store]`: SQLite by default, DynamoDB with the
//! standard AWS environment, PostgreSQL with `url` or `DATABASE_URL`). See `tollgate --help`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use tollgate::{
    admin::{Admin, KeyOptions},
    config::{StoreRole, StoreSettings},
    store::ApiKeyRecord,
    Config,
};

#[derive(Parser)]
#[command(name = "tollgate", version, about = "Plan limits and usage billing: administration")]
struct Cli {
    /// The configuration file (its `[store]` says which store the commands work on).
    #[arg(long, short, global = true, env = "TOLLGATE_CONFIG", default_value = "tollgate.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validates a configuration and summarizes it; errors name file:line:column and key.
    Check {
        /// The file to check (default: --config).
        file: Option<PathBuf>,
    },
    /// Creates the PostgreSQL schema of every role whose store is one, or applies its missing
    /// migrations (under an advisory lock; run it as the schema's owner before starting nodes
    /// whose role has only `[store] migrate = "verify"`'s privileges).
    Migrate,
    /// Copies the tenant directory (tenants with their plans, customers, overrides and
    /// subscriptions, and API key hashes) from this configuration's directory store to the one
    /// of another configuration: for moving from one store to another (SQLite to PostgreSQL).
    /// Quota counters and unexported usage stay where they are (docs/postgres.md, "Moving to
    /// it"). Running it again writes the same records again.
    CopyDirectory {
        /// The configuration whose directory store receives the copy.
        #[arg(long)]
        to: PathBuf,
    },
    /// The DynamoDB table.
    Dynamodb {
        #[command(subcommand)]
        command: DynamoCommand,
    },
    /// Tenants and their plans.
    Tenants {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// API keys (stored only as SHA-256 hashes).
    Keys {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Prepaid credits: grants of units a tenant's balance on a meter holds, kept in the quota
    /// store, spent soonest-to-expire first.
    Credits {
        #[command(subcommand)]
        command: CreditCommand,
    },
    /// A tenant's quota counters in the store.
    Quota {
        #[command(subcommand)]
        command: QuotaCommand,
    },
    /// A tenant's usage per meter and window, with what was exported of it.
    Usage {
        /// The tenant.
        tenant: String,
        /// Only this meter.
        #[arg(long)]
        meter: Option<String>,
        /// From (a date `2026-11-01`, an RFC 3339 time, or Unix seconds; default: 30 days ago).
        #[arg(long)]
        from: Option<String>,
        /// To, exclusive (same forms; default: now).
        #[arg(long)]
        to: Option<String>,
    },
    /// Exports closed windows to Stripe (`[stripe]`, key from STRIPE_SECRET_KEY or the key
    /// file): one pass, for a scheduled job. Nodes with a worker export on their own too;
    /// claims in the store keep two exporters off one aggregate.
    Export {
        /// Prints what would be sent, and sends nothing.
        #[arg(long)]
        dry_run: bool,
        /// Lists the dead letters (refused, never confirmed, too old) instead.
        #[arg(long, conflicts_with = "dry_run")]
        dead_letters: bool,
        /// Puts a dead letter back in line, as a new revision (after its cause was fixed, or a
        /// reconciliation found Stripe never took it).
        #[arg(long, num_args = 3, value_names = ["TENANT", "METER", "WINDOW"], conflicts_with_all = ["dry_run", "dead_letters"])]
        requeue: Option<Vec<String>>,
        /// Puts back in line every dead letter Stripe refused (`refused: …`), after fixing a
        /// cause they share (a meter created late). First, with the key, the letters Stripe may
        /// hold (unconfirmed, unsettled, status-less) are reconciled; too-old and `no customer`
        /// ones are left.
        #[arg(long, conflicts_with_all = ["dry_run", "dead_letters", "requeue"])]
        requeue_all: bool,
        /// Marks a dead letter's export as taken by Stripe (a reconciliation found its
        /// identifier there); WINDOW `all` confirms every `no customer` letter of the tenant's
        /// meter, once billed by hand.
        #[arg(long, num_args = 3, value_names = ["TENANT", "METER", "WINDOW"], conflicts_with_all = ["dry_run", "dead_letters", "requeue", "requeue_all"])]
        confirm: Option<Vec<String>>,
        /// On DynamoDB: gives the dead letters parked by an earlier version a TTL past any
        /// horizon, so the table never deletes them (run once after upgrading; again changes
        /// nothing).
        #[arg(long, conflicts_with_all = ["dry_run", "dead_letters", "requeue", "requeue_all", "confirm"])]
        repair_ttl: bool,
        /// After restoring a backup (or copying the store for a second deployment): exports
        /// what is due and reconciles the last 35 days under the current meter event identifier
        /// namespace (so what Stripe already holds is marked exported), then gives the store a
        /// new namespace; refused while dead letters Stripe may hold remain.
        #[arg(long, conflicts_with_all = ["dry_run", "dead_letters", "requeue", "requeue_all", "confirm", "repair_ttl"])]
        new_namespace: bool,
    },
    /// Compares what Stripe holds (its hourly meter event summaries) with what tollgate
    /// exported (the store's ledger), per tenant, meter and hour; with --fix, acts on what it
    /// proves: an hour Stripe lost is sent again as a new revision (after two passes
    /// `export.reconcile_after` apart, past Stripe's 24-hour de-duplication), dead letters that
    /// may have been taken are confirmed or requeued. Stripe holding more is only reported.
    Reconcile {
        /// From (a date, an RFC 3339 time, or Unix seconds; default: 2 days ago).
        #[arg(long)]
        from: Option<String>,
        /// To, exclusive (same forms; default: now).
        #[arg(long)]
        to: Option<String>,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Act on what is proven (otherwise only report).
        #[arg(long)]
        fix: bool,
    },
}

#[derive(Subcommand)]
enum DynamoCommand {
    /// Creates the table the configuration names (on-demand, with its indexes and TTL) and
    /// draws its meter event identifier namespace.
    CreateTable,
    /// Draws the meter event identifier namespace of a table made otherwise (CloudFormation,
    /// Terraform) if it has none; prints the table's namespace. Run it before the table's first
    /// export, with every node on this version.
    InitNamespace,
}

#[derive(Subcommand)]
enum QuotaCommand {
    /// Shows what each quota counter of a tenant holds in the store, per meter and period:
    /// the units reserved by every node (leased and owed) and a prepaid balance's granted
    /// units. With every node stopped (its leases given back), what was used.
    Show {
        /// The tenant id.
        tenant: String,
    },
}

#[derive(Subcommand)]
enum CreditCommand {
    /// Grants prepaid units to a tenant on a meter, once per grant id: run again with the same
    /// --id after a failure, and nothing is granted twice.
    Grant {
        /// The tenant id.
        tenant: String,
        /// The meter.
        meter: String,
        /// Units granted.
        units: u64,
        /// When the grant expires (RFC 3339 or Unix seconds); never without it.
        #[arg(long)]
        expires_at: Option<String>,
        /// The grant's id (an invoice or payment id); one is drawn without it, and printed.
        #[arg(long)]
        id: Option<String>,
    },
    /// Lists a tenant's grants (open, and closed ones kept: at least 35 days) and balances.
    List {
        /// The tenant id.
        tenant: String,
    },
    /// Revokes an open grant: the units it still holds leave the balance.
    Revoke {
        /// The tenant id.
        tenant: String,
        /// The grant's id.
        grant_id: String,
        /// The meter, when the id names grants on several.
        #[arg(long)]
        meter: Option<String>,
    },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Adds a tenant.
    Add {
        /// The tenant id.
        id: String,
        /// Its plan (a plan of the configuration).
        #[arg(long)]
        plan: String,
        /// Its billing customer (a Stripe customer id). A customer belongs to one tenant: one
        /// another tenant holds is refused, naming it, unless --move.
        #[arg(long)]
        customer: Option<String>,
        /// Take the customer from the tenant holding it (that tenant keeps none).
        #[arg(long = "move", requires = "customer")]
        take: bool,
        /// Its Metronome customer id or ingest alias: what its usage events carry when
        /// `[export] sink = "metronome"` (docs/metronome.md).
        #[arg(long)]
        metronome_customer: Option<String>,
    },
    /// Lists the tenants.
    List,
    /// Sets a tenant's billing customer (the fix for a wrong one), or removes it with --none.
    /// Windows waiting for export are billed to the new customer (docs/stripe.md).
    SetCustomer {
        /// The tenant id.
        id: String,
        /// The billing customer (a Stripe customer id).
        #[arg(required_unless_present = "none", conflicts_with = "none")]
        customer: Option<String>,
        /// Remove the tenant's customer.
        #[arg(long)]
        none: bool,
        /// Take the customer from the tenant holding it (that tenant keeps none).
        #[arg(long = "move", conflicts_with = "none")]
        take: bool,
    },
    /// Sets a tenant's Metronome customer id or ingest alias, or removes it with --none: what
    /// its usage events carry with `[export] sink = "metronome"` (docs/metronome.md).
    SetMetronomeCustomer {
        /// The tenant id.
        id: String,
        /// The Metronome customer id or ingest alias.
        #[arg(required_unless_present = "none", conflicts_with = "none")]
        customer: Option<String>,
        /// Remove the tenant's Metronome customer.
        #[arg(long)]
        none: bool,
    },
    /// Moves a tenant to another plan.
    SetPlan {
        /// The tenant id.
        id: String,
        /// The new plan.
        plan: String,
    },
    /// Sets a tenant's overrides of its plan, as JSON with the keys of
    /// `[tenants.X.overrides]`: '{"rate": "100/s", "burst": 200, "quotas": {"requests":
    /// {"limit": 50000, "period": "month"}}, "features": ["sso"]}'. Replaces any overrides it
    /// had; running nodes see them within limits.directory_ttl.
    SetOverride {
        /// The tenant id.
        id: String,
        /// The overrides, as JSON.
        overrides: String,
    },
    /// Removes a tenant's overrides: it is served by its plan alone.
    ClearOverride {
        /// The tenant id.
        id: String,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Issues a key for a tenant; the key is printed once, only its hash is kept.
    Issue {
        /// The tenant.
        tenant: String,
        /// Expires after this long (`90d`, `12h`).
        #[arg(long, conflicts_with = "expires_at")]
        expires_in: Option<humantime::Duration>,
        /// Expires at this time (a date, an RFC 3339 time, or Unix seconds).
        #[arg(long)]
        expires_at: Option<String>,
        /// A `tg_test_` key rather than `tg_live_`.
        #[arg(long)]
        test: bool,
    },
    /// Lists a tenant's keys: id, prefix, created, expiry.
    List {
        /// The tenant.
        tenant: String,
    },
    /// Revokes a key at once (running nodes stop taking it within the directory TTL).
    Revoke {
        /// The tenant.
        tenant: String,
        /// The key's id (`k_…`, from `keys list`).
        id: String,
    },
    /// Issues a new key and keeps the old one working for a grace period.
    Rotate {
        /// The tenant.
        tenant: String,
        /// The id of the key to replace.
        id: String,
        /// How long the old key keeps working (`24h`, `7d`).
        #[arg(long, default_value = "24h")]
        grace: humantime::Duration,
    },
    /// Imports tenants, plans, customers and existing keys (or their SHA-256 hashes) from a
    /// CSV file with a header: tenant, plan, customer, key | key_sha256, expires_at.
    Import {
        /// The CSV file (`-` for standard input).
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn load(path: &std::path::Path) -> Result<Config> {
    Config::from_path(path).map_err(Into::into)
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Check { file } => check(&load(file.as_deref().unwrap_or(&cli.config))?).await,
        Command::Migrate => migrate(&load(&cli.config)?).await,
        Command::CopyDirectory { to } => {
            let from = admin(&cli.config).await?;
            let target = Admin::open(&load(&to)?).await?;
            let report = from.copy_directory(target.directory_store().as_ref()).await?;
            println!(
                "copied {} tenants and {} API keys to the directory of {}",
                report.tenants,
                report.keys,
                to.display()
            );
            Ok(())
        }
        Command::Dynamodb { command: DynamoCommand::CreateTable } => create_table(&load(&cli.config)?).await,
        Command::Dynamodb { command: DynamoCommand::InitNamespace } => init_namespace(&load(&cli.config)?).await,
        Command::Tenants { command } => {
            let config = load(&cli.config)?;
            tenants(&Admin::open(&config).await?, &config, command).await
        }
        Command::Keys { command } => keys(&admin(&cli.config).await?, command).await,
        Command::Credits { command } => credits(&admin(&cli.config).await?, command).await,
        Command::Quota { command: QuotaCommand::Show { tenant } } => {
            let counters = admin(&cli.config).await?.quota_counters(&tenant).await?;
            println!(
                "{:<12} {:<10} {:<20} {:<20} {:>12} {:>12}",
                "meter", "period", "start", "end", "reserved", "granted"
            );
            for c in &counters {
                println!(
                    "{:<12} {:<10} {:<20} {:<20} {:>12} {:>12}",
                    c.key.meter.as_str(),
                    c.key.period_tag(),
                    time_text(c.key.start),
                    time_text(c.key.end),
                    c.reserved,
                    c.granted.map_or_else(|| "-".to_owned(), |g| g.to_string())
                );
            }
            if counters.is_empty() {
                println!("`{tenant}` has no quota counters in the store");
            }
            Ok(())
        }
        Command::Export { dry_run, dead_letters, requeue, requeue_all, confirm, repair_ttl, new_namespace } => {
            let config = load(&cli.config)?;
            if repair_ttl {
                return repair_ttl_of(&config).await;
            }
            if new_namespace {
                return new_namespace_of(config).await;
            }
            if requeue_all {
                settle_letters(&config).await;
            }
            if dead_letters || requeue_all || requeue.is_some() || confirm.is_some() {
                let admin = Admin::open(&config).await?;
                return match (requeue, confirm) {
                    (Some(key), _) => requeue_dead_letter(&admin, &key).await,
                    (_, Some(key)) => confirm_dead_letter(&admin, &key).await,
                    _ if requeue_all => requeue_all_dead_letters(&admin).await,
                    _ => list_dead_letters(&admin).await,
                };
            }
            export(config, dry_run).await
        }
        Command::Reconcile { from, to, tenant, fix } => {
            let now = now();
            let to = to.as_deref().map(parse_time).transpose()?.unwrap_or(now);
            let from = from.as_deref().map(parse_time).transpose()?.unwrap_or(to.saturating_sub(2 * 86_400));
            let mut request = tollgate::report::ReconcileRequest::new(from, to).fix(fix);
            if let Some(t) = tenant {
                request = request.tenant(t.as_str().into());
            }
            reconcile(load(&cli.config)?, &request).await
        }
        Command::Usage { tenant, meter, from, to } => {
            let now = now();
            let to = to.as_deref().map(parse_time).transpose()?.unwrap_or(now.saturating_add(1));
            let from = from.as_deref().map(parse_time).transpose()?.unwrap_or(to.saturating_sub(30 * 86_400));
            let config = load(&cli.config)?;
            let admin = Admin::open(&config).await?;
            let rows = admin.usage(&tenant, meter.as_deref(), from, to).await?;
            // As the exporter bills it: the directory's customer, else the file's, in the
            // billing system of the configured sink.
            let file = config.tenants().iter().find(|t| t.id().as_str() == tenant);
            let field = config.export().sink.map(tollgate::config::SinkKind::customer_field).unwrap_or_default();
            let metronome = field == tollgate::billing::CustomerField::Metronome;
            let customer = admin
                .directory_store()
                .tenant(&tenant.as_str().into())
                .await?
                .and_then(|t| t.customer_in(field).map(str::to_owned))
                .or_else(|| {
                    file.and_then(|t| if metronome { t.metronome_customer() } else { t.stripe_customer() })
                        .map(str::to_owned)
                });
            println!("tenant {tenant}, billing customer {}", customer.as_deref().unwrap_or("-"));
            println!(
                "{:<12} {:<22} {:>12} {:>12} {:>8}  sent for",
                "meter", "window (UTC)", "quantity", "exported", "revision"
            );
            let (mut total, mut exported) = (0u64, 0u64);
            for a in &rows {
                total += a.quantity;
                exported += a.exported;
                println!(
                    "{:<12} {:<22} {:>12} {:>12} {:>8}  {}",
                    a.key.meter.as_str(),
                    time_text(a.key.window_start),
                    a.quantity,
                    a.exported,
                    a.revision,
                    if config.exports_meter(&a.key.meter) || a.exported > 0 {
                        a.send.as_ref().and_then(|s| s.customer.as_deref()).unwrap_or("-")
                    } else {
                        "not exported (export = false)"
                    }
                );
            }
            println!("{} windows, {total} units, {exported} exported", rows.len());
            Ok(())
        }
    }
}

/// One export pass (or, with `dry_run`, what it would send).
async fn export(config: Config, dry_run: bool) -> Result<()> {
    if config.export().sink_kind(config.stripe().is_some()).is_none() {
        return Err("the configuration names no billing sink ([export] sink, or a [stripe] section): \
                    there is nowhere to export to"
            .into());
    }
    let builder = tollgate::Tollgate::builder(config.clone());
    let builder = if dry_run {
        builder
    } else {
        let sink = tollgate::billing::configured_sink(&config)?.ok_or("the configuration names no billing sink")?;
        builder.billing_sink_arc(sink)
    };
    let (engine, _worker) = builder.open().await?;
    if dry_run {
        let events = engine.export_preview().await?;
        println!(
            "{:<12} {:<14} {:<22} {:<20} {:>10} {:>12}  identifier",
            "tenant", "event name", "window (UTC)", "customer", "value", "timestamp"
        );
        for e in &events {
            println!(
                "{:<12} {:<14} {:<22} {:<20} {:>10} {:>12}  {}",
                e.tenant.as_str(),
                e.event_name,
                time_text(e.window_start),
                e.customer.as_deref().unwrap_or("-"),
                e.value,
                e.timestamp,
                e.identifier
            );
        }
        println!("{} meter events would be sent (dry run: nothing was)", events.len());
        return Ok(());
    }
    let r = engine.export().await?;
    println!(
        "{} meter events sent ({} units), {} retried later, {} dead-lettered, {} windows not billable (no customer)",
        r.events, r.units, r.retries, r.dead_letters, r.unbillable
    );
    if r.waiting > 0 {
        println!(
            "{} windows wait for a later export: their tenant's directory record could not be read, \
             or no directory holds the tenant (see the log)",
            r.waiting
        );
    }
    if r.halted {
        return Err("Stripe refused the API key (401/403): the export stopped; check STRIPE_SECRET_KEY".into());
    }
    Ok(())
}

/// `export --new-namespace`: an export pass and a reconciliation of the last 35 days under the
/// current namespace, then a new one.
async fn new_namespace_of(config: Config) -> Result<()> {
    let kind = config.export().sink_kind(config.stripe().is_some());
    if kind.is_none() {
        return Err("the configuration names no billing sink: identifiers are the billing system's".into());
    }
    let sink = tollgate::billing::configured_sink(&config)?.ok_or("the configuration names no billing sink")?;
    let (engine, _worker) = tollgate::Tollgate::builder(config.clone()).billing_sink_arc(sink).open().await?;
    let r = engine.export().await?;
    if r.halted {
        return Err("the billing system refused the key (401/403): nothing was changed".into());
    }
    println!("{} meter events sent, {} dead-lettered under the current namespace", r.events, r.dead_letters);
    if kind == Some(tollgate::config::SinkKind::Metronome) {
        // Metronome is not read back: exports in flight keep their identifiers; nothing to
        // reconcile first.
        engine.shutdown().await?;
        let admin = Admin::open(&config).await?;
        let (old, new) = admin.new_identifier_namespace().await?;
        let old = if old.is_empty() { "(empty)" } else { old.as_str() };
        println!("identifier namespace changed from {old} to {new}");
        return Ok(());
    }
    let to = now();
    let request = tollgate::report::ReconcileRequest::new(to - 35 * 86_400, to).fix(true);
    let r = engine.reconcile(&request).await?;
    println!(
        "reconciled {} hours: {} dead letters confirmed, {} requeued, {} hours of drift",
        r.compared,
        r.confirmed,
        r.requeued,
        r.drift.len() + r.more_drift
    );
    engine.shutdown().await?;
    let admin = Admin::open(&config).await?;
    let (old, new) = admin.new_identifier_namespace().await?;
    let old = if old.is_empty() { "(empty)" } else { old.as_str() };
    println!("identifier namespace changed from {old} to {new}");
    Ok(())
}

/// Before `--requeue-all`: the dead letters Stripe may hold are reconciled (confirmed when it
/// holds them, requeued once proven it does not), when the configuration has `[stripe]` and the
/// key is set; nothing else is sent. A failure is said, and `--requeue-all` goes on with what
/// Stripe refused.
async fn settle_letters(config: &Config) {
    if config.stripe().is_none() || config.export().sink_kind(true) != Some(tollgate::config::SinkKind::Stripe) {
        return;
    }
    let Ok(sink) = stripe_sink(config) else {
        println!("no Stripe key: the dead letters Stripe may hold are left for `tollgate reconcile --fix`");
        return;
    };
    let settled = async {
        // The worker is never started and the engine never shut down: no export runs.
        let (engine, _worker) = tollgate::Tollgate::builder(config.clone()).billing_sink(sink).open().await?;
        // An empty range (one whole hour to itself): the open dead letters alone, with the
        // hours they are stamped in.
        let hour = now() - now().rem_euclid(3600);
        let r = engine.reconcile(&tollgate::report::ReconcileRequest::new(hour, hour).fix(true)).await?;
        Ok::<_, Box<dyn std::error::Error>>(r)
    };
    match settled.await {
        Ok(r) => {
            println!("reconciled the dead letters Stripe may hold: {} confirmed, {} requeued", r.confirmed, r.requeued)
        }
        Err(e) => println!("the dead letters Stripe may hold could not be reconciled ({e}): they are left"),
    }
}

/// One reconciliation pass against Stripe, printed as a table of the hours that differ.
async fn reconcile(config: Config, request: &tollgate::report::ReconcileRequest) -> Result<()> {
    not_metronome(&config, "reconciliation reads Stripe's meter event summaries")?;
    if config.stripe().is_none() {
        return Err("the configuration has no [stripe] section: there is nothing to reconcile with".into());
    }
    let (engine, _worker) =
        tollgate::Tollgate::builder(config.clone()).billing_sink(stripe_sink(&config)?).open().await?;
    let r = engine.reconcile(request).await?;
    println!(
        "{:<20} {:<12} {:<12} {:<20} {:>10} {:>10} {:>8}  action",
        "hour (UTC)", "tenant", "meter", "customer", "exported", "stripe", "letters"
    );
    for d in &r.drift {
        let action = match d.action {
            tollgate::report::DriftAction::Lacking { since } => format!("lacking since {}", time_text(since)),
            other => other.label().to_owned(),
        };
        println!(
            "{:<20} {:<12} {:<12} {:<20} {:>10} {:>10} {:>8}  {action}",
            time_text(d.hour),
            d.tenant.as_str(),
            d.meter.as_str(),
            d.customer,
            d.expected,
            d.held,
            d.letters
        );
    }
    if r.more_drift > 0 {
        println!("… and {} more hours", r.more_drift);
    }
    println!(
        "{} hours compared ({} reads of Stripe), {} settling; Stripe lacks {} units and holds {} more; \
         {} resent, {} dead letters confirmed, {} requeued",
        r.compared, r.reads, r.settling, r.lacking_units, r.surplus_units, r.resent, r.confirmed, r.requeued
    );
    if r.not_compared > 0 {
        println!(
            "{} events of pre-aggregated meters are not compared (Stripe keeps their newest value)",
            r.not_compared
        );
    }
    Ok(())
}

/// Refuses a command that works against Stripe only when the sink is Metronome.
fn not_metronome(config: &Config, why: &str) -> Result<()> {
    if config.export().sink == Some(tollgate::config::SinkKind::Metronome) {
        return Err(format!(
            "export.sink is \"metronome\": {why}, and tollgate does not reconcile with Metronome (docs/metronome.md)"
        )
        .into());
    }
    Ok(())
}

#[cfg(feature = "stripe")]
fn stripe_sink(config: &Config) -> Result<tollgate::billing::StripeSink> {
    Ok(tollgate::billing::StripeSink::from_config(config)?)
}

#[cfg(not(feature = "stripe"))]
fn stripe_sink(_: &Config) -> Result<tollgate::billing::JsonlSink> {
    Err("this tollgate was built without the `stripe` feature".into())
}

fn export_key(parts: &[String]) -> Result<tollgate::store::ExportKey> {
    let [tenant, meter, window] = parts else { return Err("expected TENANT METER WINDOW".into()) };
    Ok(tollgate::store::ExportKey::new(tenant.as_str().into(), meter.as_str().into(), parse_time(window)?))
}

async fn list_dead_letters(admin: &Admin) -> Result<()> {
    let mut after = None;
    let mut n = 0;
    // `no customer` letters (a billed plan's tenant that never had one): one line per (tenant,
    // meter), windows counted: (windows, units, first, last).
    let mut no_customer: std::collections::BTreeMap<(String, String), (usize, u64, i64, i64)> = Default::default();
    println!(
        "{:<12} {:<12} {:<22} {:>12} {:>8} {:>10}  identifier / reason",
        "tenant", "meter", "window (UTC)", "window", "revision", "units"
    );
    loop {
        let page = admin.dead_letters(after.as_ref(), 100).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        for d in &page {
            n += 1;
            if d.reason.starts_with("no customer") {
                let g = no_customer.entry((d.key.tenant.to_string(), d.key.meter.to_string())).or_insert((
                    0,
                    0,
                    i64::MAX,
                    i64::MIN,
                ));
                *g = (g.0 + 1, g.1 + d.units, g.2.min(d.key.window_start), g.3.max(d.key.window_start));
                continue;
            }
            // The identifier it was sent under (its store's namespace), if its export began.
            let id = d.send.as_ref().and_then(|s| s.identifier.clone()).unwrap_or_else(|| {
                tollgate::billing::identifier(&d.key.tenant, &d.key.meter, d.key.window_start, d.revision)
            });
            println!(
                "{:<12} {:<12} {:<22} {:>12} {:>8} {:>10}  {id}",
                d.key.tenant.as_str(),
                d.key.meter.as_str(),
                time_text(d.key.window_start),
                d.key.window_start,
                d.revision,
                d.units
            );
            if let Some(s) = &d.send {
                println!(
                    "{:<83}  sent: value {} at {} for {} ({})",
                    "",
                    s.value,
                    s.timestamp,
                    s.customer.as_deref().unwrap_or("-"),
                    s.event_name
                );
            }
            println!("{:<83}  {}", "", d.reason);
        }
    }
    for ((tenant, meter), (windows, units, first, last)) in &no_customer {
        println!(
            "{tenant:<12} {meter:<12} {:<22} {:>12} {:>8} {units:>10}  no customer: {windows} windows to {} had no \
             billing customer within 35 days; bill them by hand, then: tollgate export --confirm {tenant} {meter} all",
            time_text(*first),
            first,
            "-",
            time_text(*last)
        );
    }
    println!("{n} dead letters; after fixing the cause: tollgate export --requeue TENANT METER WINDOW");
    Ok(())
}

async fn requeue_dead_letter(admin: &Admin, parts: &[String]) -> Result<()> {
    let key = export_key(parts)?;
    if admin.requeue_dead_letter(&key).await? {
        println!("requeued as a new revision: it goes out at the next export");
        Ok(())
    } else {
        Err("no such dead letter".into())
    }
}

async fn requeue_all_dead_letters(admin: &Admin) -> Result<()> {
    let (requeued, left) = admin.requeue_refused_dead_letters().await?;
    println!(
        "{requeued} dead letters requeued: they go out at the next export; \
         {left} left (unconfirmed, unsettled, without a status, no customer or too old: `tollgate reconcile --fix` \
         settles those Stripe may hold; the others one by one)"
    );
    Ok(())
}

async fn confirm_dead_letter(admin: &Admin, parts: &[String]) -> Result<()> {
    // `all`: every `no customer` letter of (tenant, meter), billed by hand together.
    if let [tenant, meter, all] = parts {
        if all == "all" {
            let mut after = None;
            let mut keys = Vec::new();
            loop {
                let page = admin.dead_letters(after.as_ref(), 100).await?;
                let Some(last) = page.last() else { break };
                after = Some(last.key.clone());
                keys.extend(
                    page.into_iter()
                        .filter(|d| {
                            d.key.tenant.as_str() == tenant
                                && d.key.meter.as_str() == meter
                                && d.reason.starts_with("no customer")
                        })
                        .map(|d| d.key),
                );
            }
            if keys.is_empty() {
                return Err(format!("{tenant} {meter} has no `no customer` dead letters").into());
            }
            let mut confirmed = 0;
            for key in &keys {
                confirmed += usize::from(admin.confirm_dead_letter(key).await?);
            }
            println!("confirmed: {confirmed} of {} `no customer` windows marked exported", keys.len());
            return Ok(());
        }
    }
    let key = export_key(parts)?;
    if admin.confirm_dead_letter(&key).await? {
        println!("confirmed: marked exported");
        Ok(())
    } else {
        Err("nothing was in flight for it: requeue it instead".into())
    }
}

async fn admin(config: &std::path::Path) -> Result<Admin> {
    Ok(Admin::open(&load(config)?).await?)
}

async fn check(config: &Config) -> Result<()> {
    println!("configuration OK");
    println!("store: {}", config.store());
    for role in StoreRole::ALL {
        if config.store_of(role) != config.store() {
            println!("  {} role: {}", role.name(), config.store_of(role));
        }
    }
    let meters: Vec<&str> = config.meters().iter().map(|m| m.id().as_str()).collect();
    println!("meters ({}): {}", meters.len(), meters.join(", "));
    println!("plans ({}):", config.plans().len());
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
        println!("  {id}: {rate}; {quotas}");
    }
    println!("routes: {}", config.routes().len());
    println!("tenants in the file: {}", config.tenants().len());
    let u = config.usage();
    println!(
        "usage: window {}, flush every {}, on store error {:?}",
        humantime::format_duration(u.window),
        humantime::format_duration(u.flush_interval),
        u.on_store_error
    );
    println!("meter event identifier namespace: {}", namespace(config).await);
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
async fn migrate(config: &Config) -> Result<()> {
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
            (from, to) if from == to => println!("schema `{}` is at version {to}: nothing to do", p.schema),
            (0, to) => println!("schema `{}` created at version {to}", p.schema),
            (from, to) => println!("schema `{}` migrated from version {from} to {to}", p.schema),
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

/// Creates the DynamoDB table of every role whose store is one (`[store]` and the roles' own).
async fn create_table(config: &Config) -> Result<()> {
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
        println!("table `{table}` created (on-demand; indexes gsi1, gsi2; TTL on `ttl`)");
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
async fn init_namespace(config: &Config) -> Result<()> {
    let StoreSettings::Dynamodb { table, endpoint } = config.store_of(StoreRole::Usage) else {
        return Err(format!("the usage store is {}, not a DynamoDB table", config.store_of(StoreRole::Usage)).into());
    };
    #[cfg(feature = "dynamodb")]
    {
        let store = tollgate::store::DynamoStore::from_env(table.clone(), endpoint.as_deref()).await;
        store.check_table().await?;
        match store.init_identifier_namespace().await? {
            (true, ns) => println!("table `{table}`: identifier namespace {ns} drawn"),
            (false, ns) if ns.is_empty() => {
                return Err(format!("table `{table}` holds a namespace item without a value: mend or delete it").into())
            }
            (false, ns) => println!("table `{table}` has its identifier namespace: {ns}"),
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
async fn repair_ttl_of(config: &Config) -> Result<()> {
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
        println!("{mended} dead letters in `{table}` given a TTL past any horizon (kept until requeued or confirmed)");
        Ok(())
    }
    #[cfg(not(feature = "dynamodb"))]
    {
        let _ = (table, endpoint);
        Err("this build of tollgate has no DynamoDB support (cargo feature `dynamodb`)".into())
    }
}

async fn tenants(admin: &Admin, config: &Config, command: TenantCommand) -> Result<()> {
    match command {
        TenantCommand::Add { id, plan, customer, take, metronome_customer } => {
            let t = match (customer.as_deref(), take, metronome_customer.as_deref()) {
                (customer, take, Some(m)) => {
                    admin.add_tenant_with_metronome_customer(&id, &plan, customer, m, take).await?
                }
                (Some(c), true, None) => admin.add_tenant_moving_customer(&id, &plan, c).await?,
                (customer, _, None) => admin.add_tenant(&id, &plan, customer).await?,
            };
            println!("tenant `{}` added on plan `{}`", t.id, t.plan);
        }
        TenantCommand::SetCustomer { id, customer, none: _, take } => {
            let t = admin.set_customer(&id, customer.as_deref(), take).await?;
            match &t.customer {
                Some(c) => println!("tenant `{}` is billed to `{c}`", t.id),
                None => println!("tenant `{}` has no billing customer", t.id),
            }
        }
        TenantCommand::SetMetronomeCustomer { id, customer, none: _ } => {
            let t = admin.set_metronome_customer(&id, customer.as_deref()).await?;
            match &t.metronome_customer {
                Some(c) => println!("tenant `{}` is billed in Metronome to `{c}`", t.id),
                None => println!("tenant `{}` has no Metronome customer", t.id),
            }
        }
        TenantCommand::List => {
            let all = admin.tenants().await?;
            println!(
                "{:<32} {:<16} {:<24} {:<20} {:<6} overrides",
                "tenant", "plan", "customer", "last billing event", "from"
            );
            // The file's tenants first: a request's key is looked up there before the store,
            // and webhooks leave their plan alone.
            let file = config.tenants();
            for t in file {
                let shadows = if all.iter().any(|s| &s.id == t.id()) { " (shadows the store's)" } else { "" };
                println!(
                    "{:<32} {:<16} {:<24} {:<20} {:<6} {}{shadows}",
                    t.id().as_str(),
                    t.plan().as_str(),
                    t.stripe_customer().unwrap_or("-"),
                    "-",
                    "file",
                    if t.overrides().is_some() { "(in the file)" } else { "-" },
                );
            }
            let mut listed = file.len();
            for t in all.iter().filter(|s| !file.iter().any(|f| f.id() == &s.id)) {
                listed += 1;
                println!(
                    "{:<32} {:<16} {:<24} {:<20} {:<6} {}",
                    t.id.as_str(),
                    t.plan.as_str(),
                    t.customer.as_deref().unwrap_or("-"),
                    t.last_event_at.map_or("-".to_owned(), time_text),
                    "store",
                    t.overrides.as_deref().unwrap_or("-")
                );
            }
            println!("{listed} tenants");
        }
        TenantCommand::SetPlan { id, plan } => {
            let t = admin.set_plan(&id, &plan).await?;
            println!("tenant `{}` is on plan `{}`", t.id, t.plan);
        }
        TenantCommand::SetOverride { id, overrides } => {
            let t = admin.set_overrides(&id, Some(&overrides)).await?;
            println!(
                "tenant `{}` on plan `{}` with overrides {}",
                t.id,
                t.plan,
                t.overrides.as_deref().unwrap_or("(none)")
            );
        }
        TenantCommand::ClearOverride { id } => {
            let t = admin.set_overrides(&id, None).await?;
            println!("tenant `{}` on plan `{}` without overrides", t.id, t.plan);
        }
    }
    Ok(())
}

async fn keys(admin: &Admin, command: KeyCommand) -> Result<()> {
    match command {
        KeyCommand::Issue { tenant, expires_in, expires_at, test } => {
            let mut options = KeyOptions::default().test(test);
            if let Some(d) = expires_in {
                options = options.expiring(now().saturating_add(secs(*d)));
            }
            if let Some(at) = expires_at {
                options = options.expiring(parse_time(&at)?);
            }
            let issued = admin.issue_key(&tenant, options).await?;
            println!("{}", issued.key);
            eprintln!(
                "key {} issued for `{tenant}`{}; it is shown only now, the store keeps its hash",
                issued.record.id,
                issued.record.expires_at.map_or(String::new(), |at| format!(", expires {}", time_text(at)))
            );
        }
        KeyCommand::List { tenant } => {
            let now = now();
            println!("{:<16} {:<16} {:<22} expires", "id", "prefix", "created (UTC)");
            for k in admin.keys(&tenant).await? {
                print_key(&k, now);
            }
        }
        KeyCommand::Revoke { tenant, id } => {
            let k = admin.revoke_key(&tenant, &id).await?;
            println!("key {} of `{tenant}` revoked", k.id);
        }
        KeyCommand::Rotate { tenant, id, grace } => {
            let until = now().saturating_add(secs(*grace));
            let issued = admin.rotate_key(&tenant, &id, until).await?;
            println!("{}", issued.key);
            eprintln!(
                "key {} issued for `{tenant}`; key {id} keeps working until {} (or its own earlier expiry); the new key is shown only now",
                issued.record.id,
                time_text(until)
            );
        }
        KeyCommand::Import { file } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?
            };
            let r = admin.import_csv(&text).await.map_err(|e| format!("{}: {e}", file.display()))?;
            println!("imported: {} tenants created, {} updated, {} keys", r.tenants_created, r.tenants_updated, r.keys);
        }
    }
    Ok(())
}

fn print_key(k: &ApiKeyRecord, now: i64) {
    let prefix = if k.prefix.is_empty() { "(hash only)".to_owned() } else { format!("{}…", k.prefix) };
    let expires = match k.expires_at {
        None => "never".to_owned(),
        Some(at) if at <= now => format!("{} (expired)", time_text(at)),
        Some(at) => time_text(at),
    };
    println!("{:<16} {:<16} {:<22} {expires}", k.id, prefix, time_text(k.created_at));
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn now() -> i64 {
    secs(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default())
}

async fn credits(admin: &Admin, command: CreditCommand) -> Result<()> {
    use tollgate::store::GrantOutcome;
    match command {
        CreditCommand::Grant { tenant, meter, units, expires_at, id } => {
            let expires_at = expires_at.as_deref().map(parse_time).transpose()?;
            let id = id.unwrap_or_else(|| {
                let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                format!("g_{:x}{:04x}", nanos.as_nanos(), std::process::id() & 0xffff)
            });
            match admin.grant_credits(&tenant, &meter, units, expires_at, &id).await? {
                GrantOutcome::Granted(b) => println!(
                    "granted {units} units of `{meter}` to `{tenant}` under id {id}; balance {} ({} granted, {} used)",
                    b.left(),
                    b.granted,
                    b.reserved
                ),
                GrantOutcome::Duplicate(g) => {
                    println!("grant {id} exists already ({} units of `{}`): nothing added", g.units, g.meter)
                }
                GrantOutcome::TooMany => {
                    return Err(format!("`{tenant}` holds the most open grants on `{meter}` already").into())
                }
                GrantOutcome::TooLarge => {
                    return Err(format!("the balance of `{tenant}` on `{meter}` would pass 2^50 units").into())
                }
                _ => return Err("the store answered a grant this build does not know".into()),
            }
        }
        CreditCommand::List { tenant } => {
            let (grants, balances) = admin.credits(&tenant).await?;
            println!("{:<12} {:<24} {:>12} {:<20} {:<20} state", "meter", "grant", "units", "granted", "expires");
            for g in &grants {
                let state = match g.closed {
                    Some(c) if c.revoked => format!("revoked {} ({} lost)", time_text(c.at), c.lost),
                    Some(c) => format!("expired {} ({} lost)", time_text(c.at), c.lost),
                    None => "open".to_owned(),
                };
                let mut state = state;
                if g.taken > 0 {
                    state.push_str(&format!(", {} of {} bought taken back by refunds", g.taken, g.bought));
                }
                if g.duplicate {
                    // Made before one grant per payment was enforced: a person decides.
                    let payment = g.payment.as_deref().unwrap_or("?");
                    state.push_str(&format!(
                        ", DUPLICATE: a second grant of payment {payment} (revoke it if it was not paid twice)"
                    ));
                }
                println!(
                    "{:<12} {:<24} {:>12} {:<20} {:<20} {state}",
                    g.meter.as_str(),
                    g.id,
                    g.units,
                    time_text(g.granted_at),
                    g.expires_at.map_or_else(|| "never".to_owned(), time_text)
                );
            }
            for (meter, b) in &balances {
                println!(
                    "balance of `{}`: {} left ({} granted, {} used)",
                    meter.as_str(),
                    b.left(),
                    b.granted,
                    b.reserved
                );
            }
            if grants.is_empty() {
                println!("`{tenant}` has no credit grants");
            }
        }
        CreditCommand::Revoke { tenant, grant_id, meter } => {
            let c = admin.revoke_credits(&tenant, meter.as_deref(), &grant_id).await?;
            println!("grant {grant_id} of `{tenant}` revoked: {} units it still held left the balance", c.lost);
        }
    }
    Ok(())
}

fn time_text(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map_or_else(|| unix.to_string(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

/// A time given as Unix seconds, an RFC 3339 time, or a date (midnight UTC).
fn parse_time(text: &str) -> Result<i64> {
    if let Ok(n) = text.parse::<i64>() {
        return Ok(n);
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).map_or(0, |t| t.and_utc().timestamp()));
    }
    Err(format!("`{text}` is not a time: give a date (2026-11-01), an RFC 3339 time or Unix seconds").into())
}
