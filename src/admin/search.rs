//! Reads for people looking at the whole: tenants found by id, billing customer or key prefix
//! (the last through a bounded scan), the windows waiting for export, and the hours where
//! reconciliation found the billing system lacking.

use crate::{
    config::TenantId,
    store::{ApiKeyRecord, LedgerEntry, TenantRecord, UsageAggregate},
};

use super::{Admin, AdminError};

/// The longest search text taken: longer text is cut (a tenant id has at most 128 characters).
pub const MAX_SEARCH_LEN: usize = 128;

/// The most tenants a search by key prefix reads the keys of: the directory is indexed by key
/// hash, not prefix, so a prefix is found by reading tenants' keys, at most this many.
pub const KEY_SCAN_TENANTS: usize = 500;

/// The most ledger entries [`Admin::lacking`] reads in one call.
pub const LEDGER_SCAN: usize = 5_000;

/// Search text as [`Admin::search_tenants`] takes it: trimmed, cut to [`MAX_SEARCH_LEN`]
/// characters, and text shaped as a key (`tg_live_…`, `tg_test_…`) cut to a key's recorded
/// prefix, so that a whole key given is never kept or shown.
#[must_use]
pub fn search_text(text: &str) -> String {
    let text = text.trim();
    // A key of tollgate's shape anywhere in it (`key: tg_live_…`, in any case): cut to its
    // prefix there.
    let lower = text.to_ascii_lowercase();
    let key_at = ["tg_live_", "tg_test_"].iter().filter_map(|p| lower.find(p)).min();
    let most = match key_at {
        Some(at) => text[..at].chars().count() + super::keys::PREFIX_CHARS,
        None => MAX_SEARCH_LEN,
    };
    text.chars().take(most.min(MAX_SEARCH_LEN)).collect()
}

/// What [`Admin::search_tenants`] found.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct TenantSearch {
    /// The text searched, cut to [`MAX_SEARCH_LEN`] (and, for a key prefix, to a key's
    /// prefix: a search never echoes a whole key).
    pub text: String,
    /// Tenants found, each once, with why: `id`, `id prefix`, `customer`, or `key` (with the
    /// matching key's prefix).
    pub found: Vec<(TenantRecord, String)>,
    /// How many tenants' keys a key prefix search read.
    pub scanned: usize,
    /// Whether the key prefix scan stopped at [`KEY_SCAN_TENANTS`] with tenants left unread.
    pub cut: bool,
    /// Where the next page of the search starts ([`Admin::search_tenants_after`]): the last
    /// tenant read, when the page is full or the scan stopped at its bound with tenants left.
    pub next: Option<TenantId>,
}

impl Admin {
    /// Tenants matching `text`, at most `limit` of them: the tenant of that id, tenants whose
    /// id starts with it, the tenant whose billing customer (Stripe, or Metronome's) it is,
    /// and, for text shaped as a key (`tg_live_…`, `tg_test_…`), tenants holding a key whose
    /// recorded prefix starts with it, found by reading the keys of at most
    /// [`KEY_SCAN_TENANTS`] tenants. Text longer than [`MAX_SEARCH_LEN`] is cut first; text
    /// longer than a key's recorded prefix is cut to it, so a whole key given is never kept.
    ///
    /// # Errors
    /// The store failed.
    pub async fn search_tenants(&self, text: &str, limit: usize) -> Result<TenantSearch, AdminError> {
        self.search_tenants_after(text, None, limit).await
    }

    /// The page of [`search_tenants`](Self::search_tenants) after the tenant `after` (a
    /// previous page's [`TenantSearch::next`]): tenants in id order past it whose id or key
    /// prefix matches, the key prefix scan reading at most [`KEY_SCAN_TENANTS`] tenants from
    /// there. The tenant of that exact id and the billing customer's are on the first page only.
    ///
    /// # Errors
    /// The store failed.
    pub async fn search_tenants_after(
        &self,
        text: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<TenantSearch, AdminError> {
        let text = search_text(text);
        let keyish = text.starts_with("tg_live_") || text.starts_with("tg_test_");
        let mut out = TenantSearch { text: text.clone(), ..TenantSearch::default() };
        if text.is_empty() || limit == 0 {
            return Ok(out);
        }
        let after = after.filter(|a| TenantId::is_valid(a)).map(TenantId::from);
        if let Some(after) = &after {
            return self.search_page(&text, keyish, after, limit, out).await;
        }
        let push = |out: &mut TenantSearch, t: TenantRecord, why: String| {
            if out.found.len() < limit && !out.found.iter().any(|(f, _)| f.id == t.id) {
                out.found.push((t, why));
            }
        };
        if TenantId::is_valid(&text) {
            let id = TenantId::from(text.as_str());
            if let Some(t) = self.directory.tenant(&id).await? {
                push(&mut out, t, "id".to_owned());
            }
            if let Some(t) = self.directory.tenant_by_customer(&text).await? {
                push(&mut out, t, "customer".to_owned());
            }
            // The id prefix's tenants in id order: the next page starts after the last shown.
            let listed = self.directory.list_tenants(Some(&id), limit).await?;
            let (full, mut last) = (listed.len() == limit, None);
            for t in listed {
                if !t.id.as_str().starts_with(&text) {
                    break;
                }
                if out.found.len() >= limit {
                    out.next = last;
                    return Ok(out);
                }
                last = Some(t.id.clone());
                push(&mut out, t, "id prefix".to_owned());
            }
            if full && !keyish && last.as_ref().is_some_and(|l| l.as_str().starts_with(&text)) {
                out.next = last;
            }
        } else if let Some(t) = self.directory.tenant_by_customer(&text).await? {
            push(&mut out, t, "customer".to_owned());
        }
        if keyish {
            return self.key_scan(&text, None, limit, out).await;
        }
        Ok(out)
    }

    /// A page after the first: the key prefix scan from `after`, or the id prefix's tenants
    /// past it.
    async fn search_page(
        &self,
        text: &str,
        keyish: bool,
        after: &TenantId,
        limit: usize,
        mut out: TenantSearch,
    ) -> Result<TenantSearch, AdminError> {
        if keyish {
            return self.key_scan(text, Some(after.clone()), limit, out).await;
        }
        if TenantId::is_valid(text) {
            let start = if after.as_str() < text { TenantId::from(text) } else { after.clone() };
            for t in self.directory.list_tenants(Some(&start), limit).await? {
                if !t.id.as_str().starts_with(text) {
                    break;
                }
                out.found.push((t, "id prefix".to_owned()));
            }
        }
        if out.found.len() >= limit {
            out.next = out.found.last().map(|(t, _)| t.id.clone());
        }
        Ok(out)
    }

    /// Tenants after `after` holding a key whose recorded prefix starts with `text`, reading
    /// the keys of at most [`KEY_SCAN_TENANTS`] tenants.
    async fn key_scan(
        &self,
        text: &str,
        mut after: Option<TenantId>,
        limit: usize,
        mut out: TenantSearch,
    ) -> Result<TenantSearch, AdminError> {
        let push = |out: &mut TenantSearch, t: TenantRecord, why: String| {
            if out.found.len() < limit && !out.found.iter().any(|(f, _)| f.id == t.id) {
                out.found.push((t, why));
            }
        };
        {
            'scan: while out.scanned < KEY_SCAN_TENANTS {
                let page = self.directory.list_tenants(after.as_ref(), 100.min(KEY_SCAN_TENANTS - out.scanned)).await?;
                if page.is_empty() {
                    break;
                }
                for t in page {
                    out.scanned += 1;
                    after = Some(t.id.clone());
                    let keys: Vec<ApiKeyRecord> = self.directory.list_keys(&t.id).await?;
                    if let Some(k) = keys.iter().find(|k| !k.prefix.is_empty() && k.prefix.starts_with(text)) {
                        let why = format!("key {}", k.prefix);
                        push(&mut out, t, why);
                        if out.found.len() >= limit {
                            break 'scan;
                        }
                    }
                }
            }
            let stopped = out.scanned >= KEY_SCAN_TENANTS || out.found.len() >= limit;
            if stopped && after.is_some() && !self.directory.list_tenants(after.as_ref(), 1).await?.is_empty() {
                out.cut = out.scanned >= KEY_SCAN_TENANTS;
                out.next = after;
            }
        }
        Ok(out)
    }

    /// The tenant holding the API key `key` (the whole key, expired or not), found by its hash
    /// in one read, with the key's record: what a search for a whole key pasted finds.
    ///
    /// # Errors
    /// The store failed.
    pub async fn key_owner(&self, key: &str) -> Result<Option<(TenantRecord, ApiKeyRecord)>, AdminError> {
        let key = key.trim();
        if key.is_empty() || key.len() > 1024 {
            return Ok(None);
        }
        let Some(record) = self.directory.key(&crate::store::KeyHash::of(key.as_bytes())).await? else {
            return Ok(None);
        };
        Ok(self.directory.tenant(&record.tenant).await?.map(|t| (t, record)))
    }

    /// A page of the directory's tenants in id order after `after`, at most `limit`.
    ///
    /// # Errors
    /// The store failed.
    pub async fn list_tenants(&self, after: Option<&str>, limit: usize) -> Result<Vec<TenantRecord>, AdminError> {
        let after = after.filter(|a| TenantId::is_valid(a)).map(TenantId::from);
        Ok(self.directory.list_tenants(after.as_ref(), limit).await?)
    }

    /// The usage windows waiting for export (or with an export in flight), not dead-lettered,
    /// that started before `before` (Unix seconds), in key order, at most `limit`.
    ///
    /// # Errors
    /// The store failed.
    pub async fn pending_exports(&self, before: i64, limit: usize) -> Result<Vec<UsageAggregate>, AdminError> {
        Ok(self.usage.pending_exports(before, None, limit).await?)
    }

    /// The ledger entries of the `hours` hours before `until` (Unix seconds, its hour
    /// included) that reconciliation found the billing system lacking, newest hour first, at
    /// most `limit`; each hour's ledger is read in pages of 100, and at most [`LEDGER_SCAN`]
    /// entries in all. Returns them, and whether the scan stopped at that bound with hours
    /// left unread.
    ///
    /// # Errors
    /// The store failed.
    pub async fn lacking(&self, until: i64, hours: u32, limit: usize) -> Result<(Vec<LedgerEntry>, bool), AdminError> {
        let top = until - until.rem_euclid(3600);
        let mut out = Vec::new();
        let mut read = 0usize;
        for h in 0..i64::from(hours) {
            let hour = top - h * 3600;
            let mut after: Option<(crate::store::ExportKey, u32)> = None;
            loop {
                if read >= LEDGER_SCAN {
                    return Ok((out, true));
                }
                let page = self.usage.ledger(hour, after.as_ref().map(|(k, r)| (k, *r)), 100).await?;
                read += page.len();
                let Some(last) = page.last() else { break };
                after = Some((last.key.clone(), last.revision));
                let full = page.len() == 100;
                out.extend(page.into_iter().filter(|e| e.lacking_since.is_some() && !e.superseded));
                if out.len() >= limit {
                    out.truncate(limit);
                    return Ok((out, false));
                }
                if !full {
                    break;
                }
            }
        }
        Ok((out, false))
    }

    /// The configuration, when given.
    #[cfg(feature = "dashboard")]
    pub(crate) fn config(&self) -> Option<&crate::config::Config> {
        self.config.as_ref()
    }

    /// The clock the administration reads (the engine's for an engine's).
    #[cfg(feature = "dashboard")]
    pub(crate) fn clock(&self) -> &crate::clock::Clock {
        &self.clock
    }
}
