//! The `tollgate` command: checks a configuration, creates the DynamoDB table or the PostgreSQL
//! schema, administers the tenant directory (tenants, plans, API keys) and reads usage, on
//! whichever store the configuration names (`[store]`: SQLite by default, DynamoDB with the
//! standard AWS environment, PostgreSQL with `url` or `DATABASE_URL`). See `tollgate --help`.

/// `println!` for the command's output: once standard output is closed (`tollgate … | head`,
/// `| grep -q`) the rest of the output is dropped and the command goes on to its end, its exit
/// status its own. (Rust ignores SIGPIPE, so `println!` would panic mid-command; a command
/// killed by it, as C tools are, could stop between two writes to the store.)
macro_rules! out {
    () => {
        $crate::util::write_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::util::write_line(format_args!($($arg)*))
    };
}

mod alerts;
mod audit;
mod credits;
mod dashboard;
mod dead_letters;
mod export;
mod keys;
mod opt;
mod plans;
mod store;
mod tenants;
mod usage;
mod util;

use std::process::ExitCode;

use clap::Parser;

use crate::{
    alerts::alerts,
    audit::audit,
    credits::credits,
    dead_letters::{confirm_dead_letter, list_dead_letters, requeue_all_dead_letters, requeue_dead_letter},
    export::{export, new_namespace_of, reconcile, settle_letters},
    keys::keys,
    opt::{Cli, Command, DynamoCommand, OrgCommand, QuotaCommand},
    plans::plans,
    store::{check, copy_directory, create_table, init_namespace, migrate, repair_ttl_of},
    tenants::tenants,
    usage::{org_show, quota_show, usage},
    util::{admin, load, now, parse_time, Result},
};

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

async fn run(cli: Cli) -> Result<()> {
    let _ = util::OPERATOR.set(util::operator_of(cli.operator));
    match cli.command {
        Command::Check { file } => check(&load(file.as_deref().unwrap_or(&cli.config))?).await,
        Command::Migrate => migrate(&load(&cli.config)?).await,
        Command::CopyDirectory { to } => copy_directory(&cli.config, &to).await,
        Command::Dynamodb { command: DynamoCommand::CreateTable } => create_table(&load(&cli.config)?).await,
        Command::Dynamodb { command: DynamoCommand::InitNamespace } => init_namespace(&load(&cli.config)?).await,
        Command::Tenants { command } => {
            let config = load(&cli.config)?;
            tenants(&crate::util::open_admin(&config).await?, &config, command).await
        }
        Command::Keys { command } => keys(&admin(&cli.config).await?, command).await,
        Command::Alerts { command } => alerts(&admin(&cli.config).await?, command).await,
        Command::Credits { command } => credits(&admin(&cli.config).await?, command).await,
        Command::Quota { command: QuotaCommand::Show { tenant } } => quota_show(&cli.config, tenant).await,
        Command::Orgs { command: OrgCommand::Show { name } } => org_show(&cli.config, name).await,
        Command::Plans { command } => {
            let loaded = load(&cli.config)?;
            plans(&crate::util::open_admin(&loaded).await?, &loaded, command).await
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
                let admin = crate::util::open_admin(&config).await?;
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
        Command::Dashboard { listen, token_file } => {
            dashboard::serve(load(&cli.config)?, listen, token_file.as_deref()).await
        }
        Command::Usage { tenant, meter, from, to } => usage(&cli.config, tenant, meter, from, to).await,
        Command::Audit { tenant, limit } => audit(&admin(&cli.config).await?, tenant.as_deref(), limit).await,
    }
}
