//! The tenants' own usage views (the usage route, `Tollgate::tenant_usage`), kept per tenant
//! on this node: one refresh per tenant per second at most, however often it is polled. The
//! views are keyed by tenants the directory knows (never by what a client sends unchecked),
//! at most [`MAX_VIEWS`] of them, the least recently used dropped first.

use std::sync::Arc;

use bytes::Bytes;

use crate::config::TenantId;

/// The most tenants whose views one node keeps.
pub(crate) const MAX_VIEWS: u64 = 10_000;

/// How long a view is served before it is made again (nanoseconds).
pub(crate) const FRESH_NANOS: i64 = 1_000_000_000;

/// A tenant's view as last made: its JSON body and its entity tag.
#[derive(Debug, Clone)]
pub(crate) struct UsageView {
    /// The JSON body.
    pub(crate) body: Bytes,
    /// Its strong entity tag, quoted: a hash of the body.
    pub(crate) etag: String,
    /// When it was made (the engine's clock, Unix nanoseconds).
    made_at: i64,
}

impl UsageView {
    /// The view of `body`, made at `made_at`.
    pub(crate) fn new(body: Bytes, made_at: i64) -> Self {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(&body);
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        let etag = format!("\"{hex}\"");
        Self { body, etag, made_at }
    }

    /// Whether it may still be served at `now` (Unix nanoseconds).
    fn fresh(&self, now: i64) -> bool {
        (0..FRESH_NANOS).contains(&now.saturating_sub(self.made_at))
    }
}

/// One tenant's slot: its view, behind a lock its refresh holds (the polls meanwhile wait
/// for it rather than read the store too).
type Slot = Arc<tokio::sync::Mutex<Option<Arc<UsageView>>>>;

/// The views of this node's tenants.
pub(crate) struct UsageViews {
    slots: moka::sync::Cache<TenantId, Slot>,
}

impl std::fmt::Debug for UsageViews {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageViews").field("tenants", &self.slots.entry_count()).finish()
    }
}

impl Default for UsageViews {
    fn default() -> Self {
        Self { slots: crate::tenant::lru(MAX_VIEWS).build() }
    }
}

impl UsageViews {
    /// `tenant`'s view at `now` (Unix nanoseconds): the last one made if it is less than a
    /// second old, else one `make` makes (one call at a time per tenant: the others wait for
    /// it and take its view). A view `make` fails to make is not kept.
    ///
    /// # Errors
    /// What `make` returns.
    pub(crate) async fn view<E, F>(
        &self,
        tenant: &TenantId,
        now: impl Fn() -> i64,
        make: impl FnOnce() -> F,
    ) -> Result<Arc<UsageView>, E>
    where
        F: std::future::Future<Output = Result<Bytes, E>>,
    {
        let slot = self.slots.get_with_by_ref(tenant, Slot::default);
        let mut kept = slot.lock().await;
        // Read after the lock: a refresh that held it has just made one.
        if let Some(view) = kept.as_ref().filter(|v| v.fresh(now())) {
            return Ok(view.clone());
        }
        let body = make().await?;
        let view = Arc::new(UsageView::new(body, now()));
        *kept = Some(view.clone());
        Ok(view)
    }

    /// `tenant`'s view if one less than a second old is kept, without waiting for a refresh
    /// under way.
    pub(crate) fn fresh(&self, tenant: &TenantId, now: i64) -> Option<Arc<UsageView>> {
        let slot = self.slots.get(tenant)?;
        let kept = slot.try_lock().ok()?;
        kept.as_ref().filter(|v| v.fresh(now)).cloned()
    }
}
