//! `tollgate credits`: prepaid credit grants and balances.

use tollgate::admin::Admin;

use crate::{
    opt::CreditCommand,
    util::{parse_time, time_text, Result},
};

pub(crate) async fn credits(admin: &Admin, command: CreditCommand) -> Result<()> {
    use tollgate::store::{Closed, GrantOutcome};
    match command {
        CreditCommand::Grant { tenant, meter, units, expires_at, id } => {
            let expires_at = expires_at.as_deref().map(parse_time).transpose()?;
            let id = id.unwrap_or_else(|| {
                let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                format!("g_{:x}{:04x}", nanos.as_nanos(), std::process::id() & 0xffff)
            });
            match admin.grant_credits(&tenant, &meter, units, expires_at, &id).await? {
                GrantOutcome::Granted(b) => out!(
                    "granted {units} units of `{meter}` to `{tenant}` under id {id}; balance {} ({} granted, {} used)",
                    b.left(),
                    b.granted,
                    b.reserved
                ),
                GrantOutcome::Duplicate(g) => {
                    out!("grant {id} exists already ({} units of `{}`): nothing added", g.units, g.meter)
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
            out!("{:<12} {:<24} {:>12} {:<20} {:<20} state", "meter", "grant", "units", "granted", "expires");
            for g in &grants {
                let state = match (g.closed, g.closed_as()) {
                    (Some(c), Some(Closed::Revoked)) => format!("revoked {} ({} lost)", time_text(c.at), c.lost),
                    (Some(c), Some(Closed::UsedUp)) => format!("used up, closed {}", time_text(c.at)),
                    (Some(c), _) => format!("expired {} ({} lost)", time_text(c.at), c.lost),
                    (None, _) => "open".to_owned(),
                };
                let mut state = state;
                if g.taken > 0 {
                    state.push_str(&format!(", {} of {} bought taken back by refunds", g.taken, g.bought));
                }
                // What each dispute or proration credit actually took (its money may have
                // bought more than the grant still held).
                for t in &g.takes {
                    let back = if t.given_back { ", given back" } else { "" };
                    state.push_str(&format!(", {} took {} ({} unspent){back}", t.id, t.removed, t.unspent));
                }
                if g.duplicate {
                    // Made before one grant per payment was enforced: a person decides.
                    let payment = g.payment.as_deref().unwrap_or("?");
                    state.push_str(&format!(
                        ", DUPLICATE: a second grant of payment {payment} (revoke it if it was not paid twice)"
                    ));
                }
                out!(
                    "{:<12} {:<24} {:>12} {:<20} {:<20} {state}",
                    g.meter.as_str(),
                    g.id,
                    g.units,
                    time_text(g.granted_at),
                    g.expires_at.map_or_else(|| "never".to_owned(), time_text)
                );
            }
            for (meter, b) in &balances {
                out!("balance of `{}`: {} left ({} granted, {} used)", meter.as_str(), b.left(), b.granted, b.reserved);
            }
            if grants.is_empty() {
                out!("`{tenant}` has no credit grants");
            }
        }
        CreditCommand::Recharge { tenant, show, meter, below, to, monthly_limit, on, off } => {
            if show.is_none() && !off && !on && below.is_none() && to.is_none() && monthly_limit.is_none() {
                return Err(
                    "say `show`, `--off`, or what to turn on: --below, --to, --monthly-limit, or --on for the \
                            plan's values"
                        .into(),
                );
            }
            let meter = match meter {
                Some(m) => m,
                None => admin.recharged_meter(&tenant).await?.to_string(),
            };
            let view = if show.is_some() {
                admin.recharge(&tenant, &meter).await?
            } else if off {
                admin.set_recharge(&tenant, &meter, None).await?
            } else {
                let ask = tollgate::money::RechargeAsk::new(below, to, monthly_limit);
                admin.set_recharge(&tenant, &meter, Some(ask)).await?
            };
            print_recharge(&view);
        }
        CreditCommand::Revoke { tenant, grant_id, meter } => {
            let c = admin.revoke_credits(&tenant, meter.as_deref(), &grant_id).await?;
            out!("grant {grant_id} of `{tenant}` revoked: {} units it still held left the balance", c.lost);
        }
    }
    Ok(())
}

/// A tenant's recharge, as `tollgate credits recharge` prints it.
fn print_recharge(view: &tollgate::money::RechargeView) {
    let money = |minor: u64| format!("{} {}", view.money(minor), view.currency);
    match view.off_reason() {
        None => out!("recharge of `{}` for `{}`: on", view.meter, view.tenant),
        Some(why) => out!("recharge of `{}` for `{}`: off ({why})", view.meter, view.tenant),
    }
    if let Some(s) = &view.state.setting {
        out!(
            "  below {} units, to {} units, at most {} a month; packs of {} units at {}",
            s.below,
            s.to,
            money(s.monthly_limit),
            s.pack.units,
            money(s.pack.amount)
        );
        if !s.set_by.is_empty() {
            out!("  set by the {} at {}", s.set_by, crate::util::time_text(s.set_at));
        }
    }
    let p = &view.plan;
    out!(
        "  plan: price {}, below {}, to at most {}, at most {} a month",
        p.price,
        p.below,
        p.to,
        money(p.monthly_limit)
    );
    out!("  failures in a row: {}", view.state.failures);
    if let Some(o) = view.state.open {
        out!("  under way: recharge {} of {} packs ({})", o.n, o.packs, money(o.amount));
    }
    out!("  this month: {} recharges, {}", view.month_count, money(view.month_spent));
}
