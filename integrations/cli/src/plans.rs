//! `tollgate plans`: how many tenants are on each version of each plan, and moving them.

use tollgate::{admin::Admin, admin::VERSION_SCAN_TENANTS, Config};

use crate::{opt::PlanCommand, util::Result};

pub(crate) async fn plans(admin: &Admin, config: &Config, command: PlanCommand) -> Result<()> {
    match command {
        PlanCommand::Migrate { plan, from, to, apply, batch, after } => {
            migrate(admin, &plan, from, to, apply, batch, after).await
        }
        PlanCommand::Versions => {
            let found = admin.plan_versions(VERSION_SCAN_TENANTS).await?;
            out!("{:<24} {:>8} {:>10}  ", "plan", "version", "tenants");
            for (plan, versions) in &found.counts {
                for (version, n) in versions {
                    let id = tollgate::config::PlanId::at_version(plan, *version);
                    let note = match config.plans().get(&id) {
                        Some(p) if p.is_current() => "current",
                        Some(_) => "",
                        None if config.put_on(plan).is_some() => "not declared: served the current version",
                        None => "not declared: the plan is not in the configuration",
                    };
                    out!("{plan:<24} {version:>8} {n:>10}  {note}");
                }
            }
            if !found.complete {
                out!("(the first {} tenants by id: the directory holds more)", found.read);
            }
            Ok(())
        }
    }
}

async fn migrate(
    admin: &Admin,
    plan: &str,
    from: u32,
    to: u32,
    apply: bool,
    batch: usize,
    mut after: Option<String>,
) -> Result<()> {
    let (mut moved, mut kept, mut read) = (0usize, 0usize, 0usize);
    let verb = if apply { "moved" } else { "would move" };
    loop {
        let done = admin.migrate_plan(plan, from, to, after.as_deref(), batch, apply).await?;
        read += done.read;
        moved += done.moved.len();
        kept += done.kept.len();
        for (tenant, why) in &done.kept {
            out!("kept {tenant} on version {from}: {why}");
        }
        if !apply {
            for tenant in &done.moved {
                out!("would move {tenant}");
            }
        }
        match done.next {
            Some(next) => {
                // Where to start again, were this run stopped here.
                out!("{verb} {moved} so far ({read} tenants read); next batch after {next}");
                after = Some(next.to_string());
            }
            None => break,
        }
    }
    out!("plan {plan}: {verb} {moved} tenants from version {from} to {to}, kept {kept} ({read} tenants read)");
    if !apply && moved > 0 {
        out!("a dry run: nothing was written (--apply moves them)");
    }
    Ok(())
}
