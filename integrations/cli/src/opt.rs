//! The command line: clap's types. Their doc comments are the texts of `tollgate --help`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tollgate", version, about = "Plan limits and usage billing: administration")]
pub(crate) struct Cli {
    /// The configuration file (its `[store]` says which store the commands work on).
    #[arg(long, short, global = true, env = "TOLLGATE_CONFIG", default_value = "tollgate.toml")]
    pub(crate) config: PathBuf,
    /// Who the changes this command makes are recorded as made by, in the audit of tenants'
    /// settings (`tollgate audit`); default: `cli:$USER`.
    #[arg(long, global = true, env = "TOLLGATE_OPERATOR")]
    pub(crate) operator: Option<String>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
    /// Alerts (threshold crossings delivered as signed webhooks from the outbox): list them,
    /// read their dead letters, send one again.
    Alerts {
        #[command(subcommand)]
        command: AlertCommand,
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
    /// Plans' versions: how many tenants are on each, and moving them from one to another.
    Plans {
        #[command(subcommand)]
        command: PlanCommand,
    },
    /// Organizations (`[orgs.NAME]`): the tenants that share an organization's limits.
    Orgs {
        #[command(subcommand)]
        command: OrgCommand,
    },
    /// Serves the read-only operator dashboard over this configuration's stores: tenants,
    /// billing (pending windows, dead letters, reconciliation's findings) and alerts, until
    /// SIGINT or SIGTERM. It needs an access token (`--token-file` or `[dashboard] token_file`)
    /// off loopback, and on loopback over a shared store (PostgreSQL, DynamoDB, Redis).
    Dashboard {
        /// The address to listen on.
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: std::net::SocketAddr,
        /// A file holding the access token (at least 32 random characters), instead of the
        /// configuration's `dashboard.token_file`.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// The audit of tenants' settings: who changed what (plan, customers, overrides, spend
    /// cap, recharge, keys, alert endpoint, tier), from what to what, when; newest first.
    Audit {
        /// Only this tenant's changes (default: every tenant's, by time).
        tenant: Option<String>,
        /// At most this many (1 to 500).
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// A tenant's usage per meter and window, with what was exported of it.
    Usage {
        /// The tenant.
        tenant: String,
        /// Only this meter (a meter with dimensions: its series; a selector,
        /// `tokens{model=m-large}`: the series it matches).
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
pub(crate) enum DynamoCommand {
    /// Creates the table the configuration names (on-demand, with its indexes and TTL) and
    /// draws its meter event identifier namespace.
    CreateTable,
    /// Draws the meter event identifier namespace of a table made otherwise (CloudFormation,
    /// Terraform) if it has none; prints the table's namespace. Run it before the table's first
    /// export, with every node on this version.
    InitNamespace,
}

#[derive(Subcommand)]
pub(crate) enum PlanCommand {
    /// Moves the tenants on one version of a plan to another, a batch at a time: a dry run
    /// (what would move, and who would be kept: overrides that do not fit) unless `--apply`.
    /// Stopped midway, run it again: the tenants moved no longer match.
    Migrate {
        /// The plan's name.
        plan: String,
        /// The version its tenants are on (1: those put on it before it had versions).
        #[arg(long)]
        from: u32,
        /// The version they move to: the plan's `version`, or one under
        /// `[plans.NAME.versions.N]`.
        #[arg(long)]
        to: u32,
        /// Writes the moves (without it, nothing is written).
        #[arg(long)]
        apply: bool,
        /// Tenants read per batch (1 to 1000).
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Starts after this tenant (a batch's `next`, printed as it goes).
        #[arg(long)]
        after: Option<String>,
    },
    /// How many tenants of the directory are on each version of each plan.
    Versions,
}

#[derive(Subcommand)]
pub(crate) enum OrgCommand {
    /// Shows an organization of the configuration: its plan, its tenants declared in the
    /// file, and what each of its quota counters holds in the store (as `quota show` shows a
    /// tenant's).
    Show {
        /// The organization's name.
        name: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum QuotaCommand {
    /// Shows what each quota counter of a tenant holds in the store, per meter and period:
    /// the units reserved by every node, and of them what the nodes keep as their last calls
    /// said (unused in their leases, held by their requests' holds, held by their jobs'
    /// reservations) and what is used; a prepaid balance's granted units. With every node
    /// stopped (its leases given back), reserved is what was used.
    Show {
        /// The tenant id.
        tenant: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum CreditCommand {
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
    /// Revokes an open grant: its units leave the balance, taken from what the balance still
    /// holds first.
    Revoke {
        /// The tenant id.
        tenant: String,
        /// The grant's id.
        grant_id: String,
        /// The meter, when the id names grants on several.
        #[arg(long)]
        meter: Option<String>,
    },
    /// A tenant's auto-recharge of a prepaid balance (`[plans.X.recharge.METER]`): `show`, or
    /// turned on with its own values within the plan's bounds (each left out is the plan's;
    /// the price's amount is read from Stripe with the secret key), or `--off`. Turning it on
    /// again after payment failures turned it off is this command.
    Recharge {
        /// The tenant id.
        tenant: String,
        /// `show` prints it and changes nothing.
        #[arg(value_parser = ["show"])]
        show: Option<String>,
        /// The meter (default: the plan's one recharged meter).
        #[arg(long)]
        meter: Option<String>,
        /// The balance under which a recharge is claimed (units).
        #[arg(long, conflicts_with_all = ["off", "show"])]
        below: Option<u64>,
        /// The balance a recharge brings it to, at least (units).
        #[arg(long, conflicts_with_all = ["off", "show"])]
        to: Option<u64>,
        /// The most recharges spend in a calendar month (UTC), a decimal of [billing] currency.
        #[arg(long, conflicts_with_all = ["off", "show"])]
        monthly_limit: Option<String>,
        /// Turns it on with the plan's values for those not given.
        #[arg(long, conflicts_with_all = ["off", "show"])]
        on: bool,
        /// Turns it off.
        #[arg(long, conflicts_with = "show")]
        off: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum TenantCommand {
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
    /// Pins a tenant's tier ([tiers.NAME]) to a plan of its ladder: it moves there, and no
    /// payment, refund or daily check moves it until --unpin (which leaves its plan as it is:
    /// it then climbs as it pays) or set-plan (which moves it, and lifts the pin).
    SetTier {
        /// The tenant id.
        id: String,
        /// The plan of a ladder to pin it to.
        #[arg(required_unless_present = "unpin", conflicts_with = "unpin")]
        plan: Option<String>,
        /// Lift the pin.
        #[arg(long)]
        unpin: bool,
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
    /// Sets a tenant's own spend cap (an amount of [billing] currency, "25.00"), lower or
    /// higher than its plan's, up to the plan's spend.max_limit (or the operator's override);
    /// or removes it with --none (the plan's cap holds again). Every node holds its
    /// reservations to it from its next call to the store. Refused (not an amount, above the
    /// maximum, a plan without a spend cap), nothing is stored.
    SetCap {
        /// The tenant id.
        id: String,
        /// The cap, a decimal amount of the currency.
        #[arg(required_unless_present = "none", conflicts_with = "none")]
        limit: Option<String>,
        /// A hard cap: work past it is refused (402). The default.
        #[arg(long, conflicts_with = "soft")]
        hard: bool,
        /// A soft cap: work past it is served and counted, and alerts tell.
        #[arg(long)]
        soft: bool,
        /// Remove the tenant's own cap.
        #[arg(long)]
        none: bool,
    },
    /// Shows a tenant's spend cap: the plan's, the tenant's own, the one in force.
    ShowCap {
        /// The tenant id.
        id: String,
    },
    /// Registers a tenant's own endpoint for its alerts (its plan must have tenant_alerts), or
    /// removes it with --none. The URL must be https and resolve to public addresses only
    /// (or [alerts] allow_private); refused, nothing is stored. Prints the new signing secret
    /// once (`whsec_…`): it is kept in the directory, deliveries are signed with it.
    SetAlertEndpoint {
        /// The tenant id.
        id: String,
        /// The endpoint's URL.
        #[arg(required_unless_present = "none", conflicts_with = "none")]
        url: Option<String>,
        /// Remove the tenant's endpoint.
        #[arg(long)]
        none: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum AlertCommand {
    /// Lists the alerts in the outbox (one line per alert and destination), in id order.
    List {
        /// Only these: pending, delivered or dead.
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Sends an alert again: its dead letters (one per destination) are pending again, due now,
    /// retried for alerts.retry_for from now, under the same webhook-id.
    Retry {
        /// The alert's id (`alert_…`, its webhook-id).
        id: String,
    },
    /// Lists the alerts given up after alerts.retry_for (dead letters), with their last error.
    DeadLetters,
}

#[derive(Subcommand)]
pub(crate) enum KeyCommand {
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
        /// What it may do at the tenant's own routes: scopes separated by commas
        /// (`usage:read`, `caps:write`, `alerts:write`, `recharge:write`, or `none`); by
        /// default usage:read,caps:write,alerts:write.
        #[arg(long, value_parser = parse_scopes)]
        scopes: Option<tollgate::store::KeyScopes>,
    },
    /// Sets a key's scopes, replaced whole (`usage:read,recharge:write`, or `none`).
    Scopes {
        /// The tenant.
        tenant: String,
        /// The key's id (`k_…`, from `keys list`).
        id: String,
        /// The scopes, separated by commas.
        #[arg(value_parser = parse_scopes)]
        scopes: tollgate::store::KeyScopes,
    },
    /// Lists a tenant's keys: id, prefix, created, expiry, scopes.
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

/// A key's scopes as the command line writes them.
fn parse_scopes(text: &str) -> Result<tollgate::store::KeyScopes, String> {
    text.parse()
}
