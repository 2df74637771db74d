//! `tollgate tenants`: tenants, their plans, customers and overrides.

use tollgate::{admin::Admin, Config};

use crate::{
    opt::TenantCommand,
    util::{time_text, Result},
};

pub(crate) async fn tenants(admin: &Admin, config: &Config, command: TenantCommand) -> Result<()> {
    match command {
        TenantCommand::Add { id, plan, customer, take, metronome_customer } => {
            let t = match (customer.as_deref(), take, metronome_customer.as_deref()) {
                (customer, take, Some(m)) => {
                    admin.add_tenant_with_metronome_customer(&id, &plan, customer, m, take).await?
                }
                (Some(c), true, None) => admin.add_tenant_moving_customer(&id, &plan, c).await?,
                (customer, _, None) => admin.add_tenant(&id, &plan, customer).await?,
            };
            out!("tenant `{}` added on plan `{}`", t.id, t.plan);
        }
        TenantCommand::SetCustomer { id, customer, none: _, take } => {
            let t = admin.set_customer(&id, customer.as_deref(), take).await?;
            match &t.customer {
                Some(c) => out!("tenant `{}` is billed to `{c}`", t.id),
                None => out!("tenant `{}` has no billing customer", t.id),
            }
        }
        TenantCommand::SetMetronomeCustomer { id, customer, none: _ } => {
            let t = admin.set_metronome_customer(&id, customer.as_deref()).await?;
            match &t.metronome_customer {
                Some(c) => out!("tenant `{}` is billed in Metronome to `{c}`", t.id),
                None => out!("tenant `{}` has no Metronome customer", t.id),
            }
        }
        TenantCommand::List => {
            let all = admin.tenants().await?;
            out!(
                "{:<32} {:<16} {:<24} {:<20} {:<6} overrides",
                "tenant",
                "plan",
                "customer",
                "last billing event",
                "from"
            );
            // The file's tenants first: a request's key is looked up there before the store,
            // and webhooks leave their plan alone.
            let file = config.tenants();
            for t in file {
                let shadows = if all.iter().any(|s| &s.id == t.id()) { " (shadows the store's)" } else { "" };
                out!(
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
                out!(
                    "{:<32} {:<16} {:<24} {:<20} {:<6} {}",
                    t.id.as_str(),
                    t.plan.as_str(),
                    t.customer.as_deref().unwrap_or("-"),
                    t.last_event_at.map_or("-".to_owned(), time_text),
                    "store",
                    t.overrides.as_deref().unwrap_or("-")
                );
            }
            out!("{listed} tenants");
        }
        TenantCommand::SetPlan { id, plan } => {
            let t = admin.set_plan(&id, &plan).await?;
            out!("tenant `{}` is on plan `{}`", t.id, t.plan);
        }
        TenantCommand::SetTier { id, plan, .. } => {
            let t = admin.set_tier(&id, plan.as_deref()).await?;
            match plan {
                Some(_) => out!("tenant `{}` is on plan `{}`, its tier pinned", t.id, t.plan),
                None => out!("tenant `{}` is on plan `{}`, its tier no longer pinned", t.id, t.plan),
            }
        }
        TenantCommand::SetOverride { id, overrides } => {
            let t = admin.set_overrides(&id, Some(&overrides)).await?;
            out!(
                "tenant `{}` on plan `{}` with overrides {}",
                t.id,
                t.plan,
                t.overrides.as_deref().unwrap_or("(none)")
            );
        }
        TenantCommand::ClearOverride { id } => {
            let t = admin.set_overrides(&id, None).await?;
            out!("tenant `{}` on plan `{}` without overrides", t.id, t.plan);
        }
        TenantCommand::SetCap { id, limit, hard: _, soft, none: _ } => {
            let mode = if soft { tollgate::config::QuotaMode::Soft } else { tollgate::config::QuotaMode::Hard };
            let view = admin.set_spend_cap(&id, limit.as_deref(), mode).await?;
            print_cap(&id, &view);
        }
        TenantCommand::ShowCap { id } => print_cap(&id, &admin.spend_cap(&id).await?),
        TenantCommand::SetAlertEndpoint { id, url, none: _ } => {
            match admin.set_alert_endpoint(&id, url.as_deref()).await? {
                Some(secret) => {
                    out!("tenant `{id}` receives its alerts at {}", url.unwrap_or_default());
                    out!("signing secret (shown once): {secret}");
                }
                None => out!("tenant `{id}` has no alert endpoint"),
            }
        }
    }
    Ok(())
}

/// A tenant's spend cap, as `set-cap` and `show-cap` print it.
fn print_cap(id: &str, view: &tollgate::money::SpendCapView) {
    let amount = tollgate::money::amount_of;
    let mode = |hard: bool| if hard { "hard" } else { "soft" };
    let by = if view.own_in_force { "the tenant's own" } else { "the plan's" };
    out!(
        "tenant `{id}`: spend cap {} {} ({}, {by}); plan's {} {} ({}); at most {} {}",
        amount(view.limit),
        view.currency,
        mode(view.hard),
        amount(view.plan_limit),
        view.currency,
        mode(view.plan_hard),
        amount(view.max_limit),
        view.currency
    );
}
