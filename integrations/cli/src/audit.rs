//! `tollgate audit [TENANT]`: who changed a tenant's settings, from what to what, when.

use tollgate::{admin::Admin, store::AuditRecord};

use crate::util::{time_text, Result};

/// A value as a line shows it: `-` for none, control characters escaped, at most 60
/// characters (the store keeps the whole; the dashboard shows it).
fn shown(v: Option<&str>) -> String {
    let Some(v) = v else { return "-".to_owned() };
    let escaped: String = v.chars().flat_map(char::escape_debug).collect();
    if escaped.chars().count() > 60 {
        format!("{}…", escaped.chars().take(59).collect::<String>())
    } else {
        escaped
    }
}

fn line(r: &AuditRecord) {
    let at = r.at.div_euclid(1_000);
    out!(
        "{:<19} {:<16} {:>5} {:<28} {:<18} {} -> {}",
        time_text(at),
        shown(Some(r.tenant.as_str())),
        r.seq,
        shown(Some(&r.actor.to_string())),
        shown(Some(r.setting.as_str())),
        shown(r.before.as_deref()),
        shown(r.after.as_deref())
    );
}

pub(crate) async fn audit(admin: &Admin, tenant: Option<&str>, limit: usize) -> Result<()> {
    if !(1..=tollgate::admin::AUDIT_PAGE_MAX).contains(&limit) {
        return Err(format!("--limit: 1 to {}, not {limit}", tollgate::admin::AUDIT_PAGE_MAX).into());
    }
    let records = admin.audit(tenant, None, limit).await?;
    out!("{:<19} {:<16} {:>5} {:<28} {:<18} before -> after", "when (UTC)", "tenant", "#", "who", "what");
    records.iter().for_each(line);
    out!("{} changes", records.len());
    Ok(())
}
