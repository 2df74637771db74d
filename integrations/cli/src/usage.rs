//! What a tenant used: `tollgate quota show` (its quota counters) and `tollgate usage` (its usage
//! per window, with what was exported of it).

use std::path::Path;

use crate::util::{admin, load, now, parse_time, time_text, Result};

/// `quota show`: what each quota counter of the tenant holds in the store: reserved, and of
/// it what the nodes keep (in leases, in their requests' holds, in their jobs' reservations,
/// as their last calls said) and what is used.
pub(crate) async fn quota_show(config: &Path, tenant: String) -> Result<()> {
    let counters = admin(config).await?.quota_counters(&tenant).await?;
    print_counters(&counters);
    if counters.is_empty() {
        out!("`{tenant}` has no quota counters in the store");
    }
    Ok(())
}

/// `orgs show`: an organization's plan and tenants from the configuration, and its quota
/// counters as `quota show` prints a tenant's.
pub(crate) async fn org_show(config: &Path, name: String) -> Result<()> {
    let loaded = load(config)?;
    let Some(org) = loaded.orgs().get(name.as_str()) else {
        return Err(format!("no organization `{name}` in the configuration ([orgs.{name}])").into());
    };
    let tenants: Vec<&str> =
        loaded.tenants().iter().filter(|t| t.org() == Some(org.id())).map(|t| t.id().as_str()).collect();
    out!("organization {} on plan {}; its counters' id `{}`", org.id(), org.plan(), org.id().counters_id());
    out!("tenants: {}", if tenants.is_empty() { "(none)".to_owned() } else { tenants.join(", ") });
    let counters = admin(config).await?.org_counters(&name).await?;
    print_counters(&counters);
    if counters.is_empty() {
        out!("`{name}` has no quota counters in the store");
    }
    Ok(())
}

/// The table of `quota show` and `orgs show`.
fn print_counters(counters: &[tollgate::store::QuotaCounter]) {
    out!(
        "{:<12} {:<10} {:<20} {:<20} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "meter",
        "period",
        "start",
        "end",
        "reserved",
        "leased",
        "held",
        "jobs",
        "used",
        "granted"
    );
    for c in counters {
        out!(
            "{:<12} {:<10} {:<20} {:<20} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
            c.key.meter.as_str(),
            c.key.period_tag(),
            bound_text(&c.key, c.key.start),
            bound_text(&c.key, c.key.end),
            c.reserved,
            c.kept.lease,
            c.kept.held,
            c.kept.jobs,
            c.used(),
            c.granted.map_or_else(|| "-".to_owned(), |g| g.to_string())
        );
    }
}

/// A counter's bound as `quota show` prints it: a time, or `-` for a prepaid balance, which
/// has none (its key's bounds are placeholders, in the 25th century).
fn bound_text(key: &tollgate::store::QuotaKey, at: i64) -> String {
    match key.period {
        tollgate::config::Period::Prepaid => "-".to_owned(),
        _ => time_text(at),
    }
}

/// `usage`: the tenant's usage per meter and window, billed as the exporter bills it.
pub(crate) async fn usage(
    config: &Path,
    tenant: String,
    meter: Option<String>,
    from: Option<String>,
    to: Option<String>,
) -> Result<()> {
    let now = now();
    let to = to.as_deref().map(parse_time).transpose()?.unwrap_or(now.saturating_add(1));
    let from = from.as_deref().map(parse_time).transpose()?.unwrap_or(to.saturating_sub(30 * 86_400));
    let config = load(config)?;
    let admin = crate::util::open_admin(&config).await?;
    let rows = admin.usage(&tenant, meter.as_deref(), from, to).await?;
    // As the exporter bills it: the directory's customer, else the file's, in the
    // billing system of the configured sink.
    let file = config.tenants().iter().find(|t| t.id().as_str() == tenant);
    let field = config.export().sink.map(tollgate::config::SinkKind::customer_field).unwrap_or_default();
    let metronome = field == tollgate::billing::CustomerField::Metronome;
    let customer = admin.tenant(&tenant).await?.and_then(|t| t.customer_in(field).map(str::to_owned)).or_else(|| {
        file.and_then(|t| if metronome { t.metronome_customer() } else { t.stripe_customer() }).map(str::to_owned)
    });
    out!("tenant {tenant}, billing customer {}", customer.as_deref().unwrap_or("-"));
    match admin.tier(&tenant).await {
        Ok(Some(tier)) => out!("tier {}", tier.line()),
        Ok(None) => {}
        // Its usage is still of use.
        Err(e) => out!("tier: unreadable ({e})"),
    }
    if let Ok(Some(grace)) = admin.past_due(&tenant).await {
        out!("past due: {}", grace.line());
    }
    // As wide as the longest meter (a series names its values: `tokens{model=m-large}`).
    let width = rows.iter().map(|a| a.key.meter.as_str().len()).max().unwrap_or(0).max(12);
    out!(
        "{:<width$} {:<22} {:>12} {:>12} {:>8}  sent for",
        "meter",
        "window (UTC)",
        "quantity",
        "exported",
        "revision"
    );
    let (mut total, mut exported) = (0u64, 0u64);
    for a in &rows {
        total += a.quantity;
        exported += a.exported;
        out!(
            "{:<width$} {:<22} {:>12} {:>12} {:>8}  {}",
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
    out!("{} windows, {total} units, {exported} exported", rows.len());
    Ok(())
}
