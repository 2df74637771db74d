//! Tenants and keys imported from CSV.

use crate::store::KeyHash;
use crate::store::KeyWrite;
use crate::{
    config::{PlanId, TenantId},
    store::{unix_now, ApiKeyRecord, StoreError, TenantRecord},
};

use super::{tenants::check_customer, Admin, AdminError};

/// What an import did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImportReport {
    /// Tenants created.
    pub tenants_created: usize,
    /// Tenants whose plan or customer changed.
    pub tenants_updated: usize,
    /// Keys written.
    pub keys: usize,
}

/// One line of an import, checked.
struct ImportRow {
    line: usize,
    tenant: TenantId,
    plan: Option<PlanId>,
    /// The plan's text named a version (`pro@3`): the tenant is put on it even when it is on
    /// another version of that plan (a plan's name alone keeps the tenant's version).
    versioned: bool,
    customer: Option<String>,
    key: Option<(KeyHash, String)>,
    expires_at: Option<i64>,
}

/// Reads of a tenant an import's line updates, while webhooks keep changing it.
const IMPORT_ATTEMPTS: usize = 5;

fn parse_import(
    text: &str,
    check_plan: impl Fn(&str) -> Result<PlanId, AdminError>,
) -> Result<Vec<ImportRow>, AdminError> {
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        return Err(AdminError::Import { line: 1, message: "empty: a header line is needed".to_owned() });
    };
    let names = split_csv(header).map_err(|m| AdminError::Import { line: 1, message: m })?;
    let known = ["tenant", "plan", "customer", "key", "key_sha256", "expires_at"];
    for n in &names {
        if !known.contains(&n.as_str()) {
            return Err(AdminError::Import {
                line: 1,
                message: format!("unknown column `{n}` (columns: {})", known.join(", ")),
            });
        }
    }
    let col = |name: &str| names.iter().position(|n| n == name);
    let Some(tenant_col) = col("tenant") else {
        return Err(AdminError::Import { line: 1, message: "a `tenant` column is needed".to_owned() });
    };
    let mut rows = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for (i, text) in lines {
        let line = i + 1;
        let bad = |message: String| AdminError::Import { line, message };
        let fields = split_csv(text).map_err(bad)?;
        if fields.len() != names.len() {
            return Err(bad(format!("{} fields, the header has {}", fields.len(), names.len())));
        }
        let get = |name: &str| col(name).map(|c| fields[c].trim()).filter(|v| !v.is_empty());
        let tenant = fields[tenant_col].trim();
        if !TenantId::is_valid(tenant) {
            return Err(bad(format!("`{tenant}` is not a tenant id: 1 to 128 visible ASCII characters")));
        }
        let versioned = get("plan").is_some_and(|p| p.contains('@'));
        let plan = match get("plan") {
            Some(p) => Some(check_plan(p).map_err(|e| bad(e.to_string()))?),
            None => None,
        };
        let customer = get("customer")
            .map(|c| check_customer(c).map(str::to_owned))
            .transpose()
            .map_err(|e| bad(e.to_string()))?;
        let key = match (get("key"), get("key_sha256")) {
            (Some(_), Some(_)) => return Err(bad("give `key` or `key_sha256`, not both".to_owned())),
            (Some(k), None) => {
                crate::tenant::check_api_key(k.as_bytes()).map_err(|why| bad(why.to_owned()))?;
                // A key of tollgate's shape keeps the prefix an issued key keeps (`tg_live_AbCd`),
                // so a search by prefix finds it; another system's key only its first 4.
                let keyish = k.starts_with("tg_live_") || k.starts_with("tg_test_");
                let shown =
                    if keyish && k.len() > 2 * super::keys::PREFIX_CHARS { super::keys::PREFIX_CHARS } else { 4 };
                let prefix: String = k.chars().take(shown).collect();
                Some((KeyHash::of(k.as_bytes()), prefix))
            }
            (None, Some(h)) => {
                let hash =
                    KeyHash::from_hex(h).ok_or_else(|| bad("`key_sha256` is not 64 hexadecimal digits".to_owned()))?;
                Some((hash, String::new()))
            }
            (None, None) => None,
        };
        if let Some((hash, _)) = &key {
            if let Some(first) = seen.insert(*hash, line) {
                return Err(bad(format!("the same key as line {first}")));
            }
        }
        let expires_at = match get("expires_at") {
            Some(v) => Some(v.parse::<i64>().map_err(|_| bad(format!("`{v}` is not a time in Unix seconds")))?),
            None => None,
        };
        rows.push(ImportRow { line, tenant: TenantId::from(tenant), plan, versioned, customer, key, expires_at });
    }
    Ok(rows)
}

/// Splits one CSV line (RFC 4180 quoting: `"a,b"`, `""` for a quote inside).
fn split_csv(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut field = String::new();
    let mut chars = line.trim_end_matches('\r').chars().peekable();
    let mut quoted = false;
    let mut started = true;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (false, '"') if started && field.is_empty() => quoted = true,
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => {
                quoted = false;
                started = false;
            }
            (false, ',') => {
                out.push(std::mem::take(&mut field));
                started = true;
            }
            (_, c) => field.push(c),
        }
    }
    if quoted {
        return Err("a quoted field is not closed".to_owned());
    }
    out.push(field);
    Ok(out)
}

impl Admin {
    /// Imports tenants, plans, billing customers and existing keys (or their SHA-256 hashes)
    /// from CSV text, so that clients keep their keys (moving off API Gateway usage plans,
    /// say). The header names the columns, in any order: `tenant` (required), `plan`
    /// (required for a tenant new to the directory), `customer`, `key` or `key_sha256`,
    /// `expires_at` (Unix seconds). Every line is checked before anything is written: a bad
    /// line is an error naming it, and nothing is imported. Importing the same file again
    /// changes nothing.
    ///
    /// # Errors
    /// A bad line (nothing imported), or the store failed (lines before it were imported;
    /// importing again is safe).
    pub async fn import_csv(&self, text: &str) -> Result<ImportReport, AdminError> {
        let rows = parse_import(text, |p| self.plan(p))?;
        // Checked against the directory before anything is written: a tenant new to it needs a
        // plan on its first line.
        let mut known = std::collections::HashSet::new();
        for row in &rows {
            if known.contains(&row.tenant) {
                continue;
            }
            if row.plan.is_none() && self.directory.tenant(&row.tenant).await?.is_none() {
                return Err(AdminError::Import {
                    line: row.line,
                    message: format!("tenant `{}` is new: it needs a plan", row.tenant),
                });
            }
            known.insert(row.tenant.clone());
        }
        // A customer belongs to one tenant: an import never moves one silently.
        let mut given: std::collections::HashMap<&str, &TenantId> = std::collections::HashMap::new();
        for row in &rows {
            let Some(c) = row.customer.as_deref() else { continue };
            let holder = match given.get(c) {
                Some(t) => Some((*t).clone()),
                None => self.directory.tenant_by_customer(c).await?.map(|t| t.id),
            };
            if let Some(holder) = holder.filter(|h| h != &row.tenant) {
                return Err(AdminError::Import {
                    line: row.line,
                    message: format!(
                        "billing customer `{c}` belongs to tenant `{holder}` (a customer belongs to one tenant: \
                         tollgate tenants set-customer … --move moves it)"
                    ),
                });
            }
            given.insert(c, &row.tenant);
        }
        for row in &rows {
            if let Some((hash, _)) = &row.key {
                if let Some(owner) = self.directory.find_key(hash).await?.filter(|t| t.id != row.tenant) {
                    return Err(AdminError::Import {
                        line: row.line,
                        message: format!("the key belongs to tenant `{}`", owner.id),
                    });
                }
            }
        }
        let mut report = ImportReport::default();
        let imported = self.import_rows(rows, &mut report).await;
        // The keys' clients may have been refused as unknown on this node (a cut-over from
        // another gateway): told once, whether or not a later line failed.
        // (A store error may come after a key was written: told then too.)
        if report.keys > 0 || imported.is_err() {
            self.keys_added();
        }
        imported.map(|()| report)
    }

    /// Writes the checked rows of [`import_csv`](Self::import_csv), counting them in `report`.
    async fn import_rows(&self, rows: Vec<ImportRow>, report: &mut ImportReport) -> Result<(), AdminError> {
        for row in rows {
            // Told of each row's tenant, also after a store error (a write may have been made).
            let tenant = row.tenant.clone();
            let written = self.import_row(row, report).await;
            self.changed(&tenant).await;
            written?;
        }
        Ok(())
    }

    /// Updates a tenant the directory holds with a row's plan and customer: each written only
    /// over the record read (a webhook or a migration moving the tenant meanwhile is read
    /// again, never written back over), read again while they race.
    async fn import_existing(
        &self,
        row: &ImportRow,
        mut read: TenantRecord,
        report: &mut ImportReport,
    ) -> Result<TenantRecord, AdminError> {
        use crate::store::{TenantUpdate, UpdateWhen};
        for _ in 0..IMPORT_ATTEMPTS {
            let mut r = read.clone();
            // The plan named again keeps the tenant's version of it, unless the line names one.
            if let Some(plan) = &row.plan {
                r.plan = if row.versioned { plan.clone() } else { r.plan.kept_for(plan.clone()) };
            }
            if row.customer.is_some() {
                r.customer = row.customer.clone();
            }
            if r == read {
                return Ok(r);
            }
            let mut over = read.clone();
            let mut raced = false;
            let updates = [
                (r.plan != over.plan).then(|| TenantUpdate::Plan(r.id.clone(), r.plan.clone())),
                (r.customer != over.customer).then(|| TenantUpdate::Customer(r.id.clone(), r.customer.clone())),
            ];
            for update in updates.into_iter().flatten() {
                if !self.directory.update_tenant(&update, UpdateWhen::Unchanged(&over)).await? {
                    raced = true;
                    break;
                }
                // Recorded as each lands: a later one that races leaves this one written.
                use crate::store::Setting;
                match update {
                    TenantUpdate::Plan(_, plan) => {
                        let before = std::mem::replace(&mut over.plan, plan);
                        self.record(&r.id, Setting::Plan, Some(before.to_string()), Some(over.plan.to_string())).await;
                    }
                    TenantUpdate::Customer(_, customer) => {
                        let before = std::mem::replace(&mut over.customer, customer);
                        self.record(&r.id, Setting::Customer, before, over.customer.clone()).await;
                    }
                    _ => {}
                }
            }
            if !raced {
                report.tenants_updated += 1;
                return Ok(r);
            }
            read = self.existing(row.tenant.as_str()).await?;
        }
        Err(AdminError::Import {
            line: row.line,
            message: format!("tenant `{}` kept changing while it was imported (webhooks): import again", row.tenant),
        })
    }

    /// Writes one row of [`import_csv`](Self::import_csv): its tenant, then its key.
    async fn import_row(&self, row: ImportRow, report: &mut ImportReport) -> Result<(), AdminError> {
        let line = row.line;
        let current = self.directory.tenant(&row.tenant).await?;
        let record = match current {
            None => {
                let Some(plan) = row.plan.clone() else {
                    return Err(AdminError::Import {
                        line,
                        message: format!("tenant `{}` is new: it needs a plan", row.tenant),
                    });
                };
                let mut r = TenantRecord::new(row.tenant.clone(), plan);
                r.customer = row.customer.clone();
                self.directory.put_tenant(&r, &[]).await?;
                report.tenants_created += 1;
                self.record(&r.id, crate::store::Setting::Tenant, None, Some(super::tenants::tenant_text(&r))).await;
                r
            }
            Some(r) => self.import_existing(&row, r, report).await?,
        };
        if let Some((hash, prefix)) = row.key {
            // A key the tenant holds keeps what the line does not say (its expiry, say,
            // during a rotation's grace): importing the same file again changes nothing.
            // Read by its hash (a listing may read an index that lags: a key narrowed or
            // revoked just before would be written back as it was).
            let held = self.directory.key(&hash).await?.filter(|k| k.tenant == record.id);
            let before = held.as_ref().map(super::keys::key_text);
            let key = match held {
                Some(k) => {
                    let expiry = row.expires_at.or(k.expires_at);
                    let prefix = if k.prefix.is_empty() { prefix } else { k.prefix.clone() };
                    k.with_prefix(prefix).with_expiry(expiry)
                }
                None => ApiKeyRecord::new(hash, record.id.clone(), unix_now())
                    .with_prefix(prefix)
                    .with_expiry(row.expires_at),
            };
            self.directory.put_key(&key, KeyWrite::Upsert).await.map_err(|e| match e {
                StoreError::Conflict(_) => {
                    AdminError::Import { line, message: "the key belongs to another tenant".to_owned() }
                }
                e => AdminError::Store(e),
            })?;
            report.keys += 1;
            self.record(&record.id, crate::store::Setting::Key, before, Some(super::keys::key_text(&key))).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_lines_split_with_quotes() {
        assert_eq!(split_csv("a,b,,c").unwrap(), ["a", "b", "", "c"]);
        assert_eq!(split_csv("\"a,b\",\"say \"\"hi\"\"\",c\r").unwrap(), ["a,b", "say \"hi\"", "c"]);
        assert!(split_csv("\"open").is_err());
    }

    #[test]
    fn an_import_names_its_bad_line_and_keeps_nothing() {
        let ok = |p: &str| Ok(PlanId::from(p));
        let e = parse_import("tenant,plan,key\nacme,free,k1\nbeta,free,k1\n", ok).err().unwrap();
        assert_eq!(e.to_string(), "line 3: the same key as line 2");
        let e = parse_import("tenant,plan,colour\n", ok).err().unwrap();
        assert!(e.to_string().starts_with("line 1: unknown column `colour`"), "{e}");
        let e = parse_import("tenant,key_sha256\nacme,abc\n", ok).err().unwrap();
        assert_eq!(e.to_string(), "line 2: `key_sha256` is not 64 hexadecimal digits");
        let e = parse_import("tenant,plan\nacme\n", ok).err().unwrap();
        assert_eq!(e.to_string(), "line 2: 1 fields, the header has 2");
        let rows = parse_import("plan,tenant,expires_at\n\nfree,acme,100\n", ok).unwrap();
        assert_eq!((rows[0].line, rows[0].expires_at, rows[0].key.is_none()), (3, Some(100), true));
    }
}
