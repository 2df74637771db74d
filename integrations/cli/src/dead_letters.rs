//! `tollgate export --dead-letters`, `--requeue`, `--requeue-all` and `--confirm`: the exports
//! parked as dead letters.

use tollgate::admin::Admin;

use crate::util::{parse_time, time_text, Result};

fn export_key(parts: &[String]) -> Result<tollgate::store::ExportKey> {
    let [tenant, meter, window] = parts else { return Err("expected TENANT METER WINDOW".into()) };
    Ok(tollgate::store::ExportKey::new(tenant.as_str().into(), meter.as_str().into(), parse_time(window)?))
}

pub(crate) async fn list_dead_letters(admin: &Admin) -> Result<()> {
    let mut after = None;
    let mut n = 0;
    // `no customer` letters (a billed plan's tenant that never had one): one line per (tenant,
    // meter), windows counted: (windows, units, first, last).
    let mut no_customer: std::collections::BTreeMap<(String, String), (usize, u64, i64, i64)> = Default::default();
    out!(
        "{:<12} {:<12} {:<22} {:>12} {:>8} {:>10}  identifier / reason",
        "tenant",
        "meter",
        "window (UTC)",
        "window",
        "revision",
        "units"
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
            out!(
                "{:<12} {:<12} {:<22} {:>12} {:>8} {:>10}  {id}",
                d.key.tenant.as_str(),
                d.key.meter.as_str(),
                time_text(d.key.window_start),
                d.key.window_start,
                d.revision,
                d.units
            );
            if let Some(s) = &d.send {
                out!(
                    "{:<83}  sent: value {} at {} for {} ({})",
                    "",
                    s.value,
                    s.timestamp,
                    s.customer.as_deref().unwrap_or("-"),
                    s.event_name
                );
            }
            out!("{:<83}  {}", "", d.reason);
        }
    }
    for ((tenant, meter), (windows, units, first, last)) in &no_customer {
        out!(
            "{tenant:<12} {meter:<12} {:<22} {:>12} {:>8} {units:>10}  no customer: {windows} windows to {} had no \
             billing customer within 35 days; bill them by hand, then: tollgate export --confirm {tenant} {meter} all",
            time_text(*first),
            first,
            "-",
            time_text(*last)
        );
    }
    out!("{n} dead letters; after fixing the cause: tollgate export --requeue TENANT METER WINDOW");
    Ok(())
}

pub(crate) async fn requeue_dead_letter(admin: &Admin, parts: &[String]) -> Result<()> {
    let key = export_key(parts)?;
    if admin.requeue_dead_letter(&key).await? {
        out!("requeued as a new revision: it goes out at the next export");
        Ok(())
    } else {
        Err("no such dead letter".into())
    }
}

pub(crate) async fn requeue_all_dead_letters(admin: &Admin) -> Result<()> {
    let (requeued, left) = admin.requeue_refused_dead_letters().await?;
    out!(
        "{requeued} dead letters requeued: they go out at the next export; \
         {left} left (unconfirmed, unsettled, without a status, no customer or too old: `tollgate reconcile --fix` \
         settles those Stripe may hold; the others one by one)"
    );
    Ok(())
}

pub(crate) async fn confirm_dead_letter(admin: &Admin, parts: &[String]) -> Result<()> {
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
            out!("confirmed: {confirmed} of {} `no customer` windows marked exported", keys.len());
            return Ok(());
        }
    }
    let key = export_key(parts)?;
    if admin.confirm_dead_letter(&key).await? {
        out!("confirmed: marked exported");
        Ok(())
    } else {
        Err("nothing was in flight for it: requeue it instead".into())
    }
}
