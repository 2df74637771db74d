//! The tenant directory as this node sees it: the store's answers cached in the tenant
//! table, revalidated off the request path within `limits.directory_ttl`, invalidated at
//! once on demand; unknown credentials cached for `limits.negative_ttl`; the tenant cap held
//! on insertion, whether or not the worker runs.

use crate::engine::table::{Lookup, ANONYMOUS};
use std::sync::Arc;

use crate::engine::admit::{gate::Gate, stage::OwnedCredential};
use crate::{
    config::{StoreErrorPolicy, TenantId, ANONYMOUS_TENANT},
    plan::{CompiledPlan, Runtime, StaticTenant},
    response::{Rejection, RejectionKind},
    store::TenantRecord,
    tenant::{KeyHash, Tenant, TenantState},
};

/// The directory record of a tenant declared in the configuration.
fn declared(t: &StaticTenant) -> TenantRecord {
    let mut r = TenantRecord::new(t.id.clone(), t.plan.clone());
    r.customer = t.customer.clone();
    r.metronome_customer = t.metronome_customer.clone();
    r.overrides = t.overrides.clone();
    r
}

/// How many tenants one revalidation pass reads before it yields.
const BATCH: usize = 100;

/// How many times a lookup reads the directory when the tenant changes there while it reads
/// (each change told to this node); then 503.
const LOOKUP_READS: usize = 3;

impl Gate {
    /// Finds (or creates) the state of a tenant the table does not know yet.
    /// `address`: the client address's key (0: none), whose directory lookups of API keys are
    /// limited (`identify.unknown_key_rate`).
    pub(crate) async fn lookup(&self, credential: OwnedCredential, address: u64) -> Result<Tenant, Rejection> {
        self.lookup_serving(credential, address, true).await
    }

    /// [`lookup`](Self::lookup); with `fail_open` false, a directory that does not answer is
    /// refused (503) even under an anonymous plan that fails open (a caller that must be
    /// told apart from the anonymous tenant).
    pub(crate) async fn lookup_serving(
        &self,
        credential: OwnedCredential,
        address: u64,
        fail_open: bool,
    ) -> Result<Tenant, Rejection> {
        // A change of the directory this node is told of while a lookup reads it (a key
        // removed, a plan changed: `invalidate_*`, revalidation) may come after the read: the
        // lookup then reads again, so that what the change removed is not attached after it.
        for _ in 0..LOOKUP_READS {
            if let Some(state) = self.lookup_once(&credential, address, fail_open).await? {
                return Ok(state);
            }
        }
        Err(Rejection::new(
            RejectionKind::StoreUnavailable,
            "the tenant changed in the directory while it was read; send the request again",
        )
        .with_retry_after(1))
    }

    /// One read of [`lookup_serving`](Self::lookup_serving): `None` when the tenant changed in
    /// the directory meanwhile (what was attached is let go), to be read again.
    async fn lookup_once(
        &self,
        credential: &OwnedCredential,
        address: u64,
        fail_open: bool,
    ) -> Result<Option<Tenant>, Rejection> {
        // Where the directory's changes stand, then the configuration: a reload stores the new
        // one before it marks every change. Taken again just before the store is read (the
        // limits' waits then fall outside), when a configuration reloaded meanwhile sends the
        // lookup round again.
        let mut seen = self.table.changes_seen();
        let rt = self.shared.runtime().load_full();
        let now = self.shared.clock().unix_secs();
        let lookup = match credential {
            OwnedCredential::ApiKey(key) => {
                // The request path checks a key's characters only when the table does not
                // hold it, so a key must never reach the table without this check: every key
                // the table holds came through here.
                if let Err(why) = crate::tenant::check_api_key(key) {
                    let why = if why == crate::tenant::COMMA_IN_KEY { crate::response::REPEATED_KEY } else { why };
                    return Err(Rejection::new(RejectionKind::MalformedCredentials, why));
                }
                Lookup::ApiKey(key)
            }
            OwnedCredential::Tenant(id) => Lookup::Identity(id.as_str()),
            OwnedCredential::Anonymous => Lookup::Identity(ANONYMOUS),
        };
        let digest = self.table.digest(lookup);
        let unknown_key = (digest.lo, digest.hi);
        // One lookup per credential at a time: the requests that waited for another's lookup
        // find its answer (the tenant in the table, or the key remembered as unknown). A key
        // remembered as unknown needs no turn.
        let now_nanos = self.shared.clock().unix_nanos();
        let known_unknown = self.unknown.get(&unknown_key).is_some_and(|until| now_nanos < until);
        let _turn = if known_unknown { None } else { Some(self.table.lookup_turn(unknown_key).await) };
        if let Some(state) = self.table.get(lookup) {
            return Ok(Some(state));
        }
        let mut hash = None;
        let mut validated = now;
        // Remembered as unknown until `negative_ttl` after the lookup that found it so: a hit
        // never renews the entry, so a key issued meanwhile is accepted within that time.
        let now_nanos = self.shared.clock().unix_nanos();
        let remembered = known_unknown || self.unknown.get(&unknown_key).is_some_and(|until| now_nanos < until);
        let record = if remembered {
            self.shared.totals().negative_hits.add(1);
            Ok(None)
        } else {
            match credential {
                OwnedCredential::ApiKey(key) => {
                    let h = KeyHash::of(key);
                    hash = Some(h);
                    match rt.static_keys.get(&h).and_then(|t| rt.static_tenants.get(t)) {
                        Some(r) => {
                            validated = i64::MAX;
                            Ok(Some(declared(r)))
                        }
                        None => {
                            // Limited per client address before the store is asked, when the
                            // address is the client's own: past the limit 429, never 401 (the
                            // key may be valid). Only keys the directory did not know count.
                            // Other requests (behind a balancer that is not a trusted proxy,
                            // without an address) share the node's budget, where they wait
                            // their turn (at most a second) and are never refused for unknown
                            // keys: one bucket for them all would let anyone lock every tenant
                            // the node does not hold out.
                            let lookups = &self.key_lookups;
                            let rate = rt.config.clients.unknown_key_rate;
                            let clock = self.shared.clock();
                            // A key found valid before is looked up at once.
                            let known = lookups.is_known(unknown_key);
                            let own = if address == 0 || known {
                                None
                            } else {
                                match lookups.take(address, rate, || clock.unix_nanos()).await {
                                    Ok(own) => Some(own),
                                    Err(wait) => {
                                        let r = Rejection::new(
                                            RejectionKind::RateLimited,
                                            "too many unknown API keys from this address: try again later",
                                        )
                                        .with_retry_after(wait);
                                        if !rt.config.limits.shadow {
                                            return Err(r);
                                        }
                                        // Shadow mode: counted, not refused; the shared budget.
                                        self.would_refuse(&r);
                                        None
                                    }
                                }
                            };
                            let turn =
                                match (&own, known) {
                                    (Some(_), _) | (None, true) => None,
                                    (None, false) => match lookups.shared_turn(crate::base::issued_shape(key)).await {
                                        Some(turn) => Some(turn),
                                        None => return Err(Rejection::new(
                                            RejectionKind::StoreUnavailable,
                                            "too many lookups of API keys are waiting on this node: try again later",
                                        )
                                        .with_retry_after(1)),
                                    },
                                };
                            seen = self.table.changes_seen();
                            let fresh = self.shared.runtime().load_full();
                            if !Arc::ptr_eq(&fresh, &rt) {
                                // Reloaded while this lookup waited: the key may be declared
                                // now. Read again, under the new configuration (the address's
                                // cell given back: it is taken again).
                                if let Some(own) = &own {
                                    own.give_back(rate);
                                }
                                return Ok(None);
                            }
                            self.follow.looked_up.store(true, std::sync::atomic::Ordering::Relaxed);
                            let found = self.shared.stores().request().directory.find_key(&h).await;
                            match (&own, &found) {
                                // Only unknown keys count.
                                (Some(own), found) if !matches!(found, Ok(None)) => own.give_back(rate),
                                (None, Ok(None)) if !known => lookups.shared_unknown(),
                                _ => {}
                            }
                            if let Ok(record) = &found {
                                lookups.found(unknown_key, record.is_some());
                            }
                            drop((own, turn));
                            found
                        }
                    }
                }
                OwnedCredential::Tenant(id) => match rt.static_tenants.get(id) {
                    Some(r) => {
                        validated = i64::MAX;
                        Ok(Some(declared(r)))
                    }
                    None => {
                        seen = self.table.changes_seen();
                        if !Arc::ptr_eq(&self.shared.runtime().load_full(), &rt) {
                            // Reloaded meanwhile: the tenant may be declared now.
                            return Ok(None);
                        }
                        self.follow.looked_up.store(true, std::sync::atomic::Ordering::Relaxed);
                        self.shared.stores().request().directory.tenant(id).await
                    }
                },
                OwnedCredential::Anonymous => Ok(None),
            }
        };
        let record = match record {
            Ok(r) => r,
            Err(_) => {
                // Without a tenant nothing can be billed: only an anonymous plan can fail open.
                return match &rt.anonymous {
                    Some(plan) if fail_open && plan.on_store_error == StoreErrorPolicy::FailOpen => {
                        Ok(self.anonymous(&rt, plan, seen))
                    }
                    _ => Err(Rejection::new(
                        RejectionKind::StoreUnavailable,
                        "the tenant directory did not answer in time",
                    )
                    .with_retry_after(1)),
                };
            }
        };
        let Some(record) = record else {
            if !remembered && !matches!(credential, OwnedCredential::Anonymous) {
                let ttl = i64::try_from(rt.config.limits.negative_ttl.as_nanos()).unwrap_or(i64::MAX);
                self.unknown.insert(unknown_key, now_nanos.saturating_add(ttl));
                // A key issued (and the node told) while it was read is not remembered as
                // unknown: `invalidate_key` marks it before it clears the entry.
                if self.table.key_changed_since(seen, lookup) {
                    self.unknown.invalidate(&unknown_key);
                }
            }
            return match &rt.anonymous {
                Some(plan) => Ok(self.anonymous(&rt, plan, seen)),
                None => {
                    let mut r =
                        Rejection::new(RejectionKind::UnknownCredentials, "the credential does not match any tenant");
                    r.inner.challenge = Some(rt.challenge.clone());
                    Err(r)
                }
            };
        };
        if !TenantId::is_valid(record.id.as_str()) || (rt.anonymous.is_some() && record.id.as_str() == ANONYMOUS_TENANT)
        {
            // Never served as another tenant (the anonymous one) nor under an id no export can
            // carry: the directory must be mended.
            tracing::error!(tenant = %record.id, "the directory holds a tenant id outside the tenant id grammar, or the anonymous tenant's");
            return Err(Rejection::new(
                RejectionKind::StoreUnavailable,
                "the tenant directory holds an invalid tenant",
            )
            .with_retry_after(60));
        }
        let (plan, unfit) = match served_plan(&rt, &record) {
            Ok(plan) => plan,
            Err(why) => {
                tracing::error!(tenant = %record.id, plan = %record.plan, "the tenant's plan cannot be served: {why}");
                return Err(Rejection::new(RejectionKind::StoreUnavailable, "the tenant's plan is not configured")
                    .with_retry_after(60));
            }
        };
        let attached = self.table.attach_read(lookup, hash, &record.id, validated, Some(seen), || {
            if let Some(why) = &unfit {
                self.overrides_not_served(&record, why);
            }
            TenantState::new(record.id.clone(), plan.clone(), self.customer_of(&record).map(Arc::from))
                .with_past_due(crate::billing::past_due(&rt.config, record.subscriptions.as_deref()))
        });
        let Some(state) = attached else {
            // The record may predate the change: nothing of it attached, to be read again.
            tracing::debug!(tenant = %record.id, "the tenant changed in the directory while it was read: read again");
            return Ok(None);
        };
        self.after_insert(&rt);
        Ok(Some(state))
    }

    /// The anonymous tenant, under the configuration `rt` loaded after `seen`: `None` when a
    /// reload came since (its plan may be the previous configuration's), to be read again.
    fn anonymous(&self, rt: &Runtime, plan: &Arc<CompiledPlan>, seen: u64) -> Option<Tenant> {
        let id = TenantId::from(ANONYMOUS_TENANT);
        let state = self.table.attach_read(Lookup::Identity(ANONYMOUS), None, &id, i64::MAX, Some(seen), || {
            TenantState::new(id.clone(), plan.clone(), None)
        })?;
        self.after_insert(rt);
        Some(state)
    }

    /// The tenant's customer in the billing system its usage is exported to.
    fn customer_of(&self, record: &TenantRecord) -> Option<String> {
        record.customer_in(self.customer_field).map(str::to_owned)
    }

    /// Holds the tenant cap on insertion, so that it holds where no worker runs (AWS Lambda):
    /// past the cap, the least recently seen sixteenth of it is evicted at once (their usage
    /// is drained and their leases returned by the next flush). The worker is woken too.
    fn after_insert(&self, rt: &Runtime) {
        let max = rt.config.limits.max_tenants;
        let tracked = self.table.len();
        if tracked > max {
            let mut seen = self.table.last_seen();
            seen.sort_unstable_by_key(|(t, _)| *t);
            let keep = max - (max / 16).min(max.saturating_sub(1));
            let extra = seen.len().saturating_sub(keep);
            let evicted = self.table.evict(seen.drain(..extra).map(|(_, id)| id));
            if !evicted.is_empty() {
                self.shared.totals().evictions.add(evicted.len() as u64);
            }
            self.shared.sweep_now().notify_one();
        }
        self.shared.metrics().tenants.set(self.table.len() as f64);
    }

    /// Confirms with the store the tenants this node holds, off the request path (the worker
    /// calls it; front doors without one may too). Tenants last confirmed more than
    /// `limits.directory_ttl` ago and seen within it are read again, in batches: one store
    /// read per credential (`find_key`, or `tenant` for an identity). A credential the store
    /// no longer has stops working; a changed plan or customer gets a new state (the old
    /// one's usage is kept and billed, its leases go back). Tenants not seen within the TTL
    /// are dropped from the table instead, to be looked up on their next request. Tenants
    /// declared in the configuration are not read. Returns how many tenants were read.
    pub(crate) async fn revalidate(&self) -> usize {
        let rt = self.shared.runtime().load_full();
        let ttl = rt.config.limits.directory_ttl.as_secs() as i64;
        let now = self.shared.clock().unix_secs();
        // Read again a quarter of a TTL early: the worker passes every quarter TTL, so a
        // change reaches this node within the TTL.
        let stale = self.table.stale(now - ttl + ttl / 4);
        let (active, idle): (Vec<_>, Vec<_>) = stale.into_iter().partition(|(_, seen, _)| *seen >= now - ttl);
        let dropped = self.table.evict(idle.into_iter().map(|(id, _, _)| id));
        self.units.leases().return_leases(dropped).await;
        let mut read = 0;
        for batch in active.chunks(BATCH) {
            for (id, _, creds) in batch {
                read += 1;
                // A change this node is told of while the record is read wins over it, a
                // reload's too: the configuration is loaded after.
                let seen = self.table.changes_seen();
                let rt = self.shared.runtime().load_full();
                let mut record: Option<TenantRecord> = None;
                let mut failed = false;
                for (digest, hash) in creds {
                    let answer = match hash {
                        Some(h) => self.shared.stores().background().directory.find_key(h).await,
                        None => self.shared.stores().background().directory.tenant(id).await,
                    };
                    match answer {
                        Ok(Some(r)) if r.id == *id => record = Some(r),
                        Ok(_) => self.table.forget(*digest),
                        Err(e) => {
                            // Kept as it is; asked again at the next pass, which stops here:
                            // a store that fails is not asked once per tenant.
                            tracing::debug!(error = %e, "revalidating tenants stopped at a store error");
                            failed = true;
                            break;
                        }
                    }
                }
                if failed {
                    return read;
                }
                match record {
                    None => {
                        self.table.tenant_changed(id);
                        let gone = self.table.evict([id.clone()]);
                        self.units.leases().return_leases(gone).await;
                    }
                    Some(r) => self.refresh(&rt, r, now, seen).await,
                }
            }
            tokio::task::yield_now().await;
        }
        read
    }

    /// Applies a directory record to the tenant held: a new state if its plan or customer
    /// changed, else just confirmed.
    async fn refresh(&self, rt: &Runtime, record: TenantRecord, now: i64, seen: u64) {
        let Some(current) = self.table.state(&record.id) else {
            return;
        };
        let overrides = record.overrides.as_deref().filter(|o| !o.trim().is_empty());
        let (plan, unfit) = match served_plan(rt, &record) {
            Ok(plan) => plan,
            Err(why) => {
                tracing::error!(tenant = %record.id, plan = %record.plan, "the tenant's new plan cannot be served ({why}); kept on its plan");
                self.confirm_unless_changed(&record.id, now, seen);
                return;
            }
        };
        // What the tenant is served with now: its plan, with its overrides or the part of them
        // that fits it (then already served so: nothing changed).
        let served = plan.overrides.as_deref();
        let past_due = crate::billing::past_due(&rt.config, record.subscriptions.as_deref());
        let changed = current.plan.id != plan.id
            || current.customer() != record.customer_in(self.customer_field)
            || current.plan.overrides.as_deref() != served
            || current.past_due().map(|n| &n.grace) != past_due.as_ref();
        if !changed {
            self.confirm_unless_changed(&record.id, now, seen);
            return;
        }
        let old = self.table.replace(&record.id, now, seen, || {
            if let Some(why) = &unfit {
                self.overrides_not_served(&record, why);
            }
            TenantState::new(record.id.clone(), plan.clone(), self.customer_of(&record).map(Arc::from))
                .with_past_due(past_due.clone())
        });
        if let Some(old) = old {
            tracing::info!(tenant = %record.id, from = %old.plan.id, to = %record.plan, overrides, "tenant plan changed");
            self.units.leases().return_leases(vec![old]).await;
        }
    }

    /// Records that the directory confirmed `id` at `now`, unless a change was told of it
    /// since the read began (`seen`): then what was read may be older than the change, and
    /// the tenant is left to be read again.
    fn confirm_unless_changed(&self, id: &TenantId, now: i64, seen: u64) {
        if !self.table.tenant_changed_since(seen, id) {
            self.table.confirmed(id, now);
        }
    }

    /// Counts and logs a tenant served its plan without the overrides, which do not fit it.
    #[cold]
    fn overrides_not_served(&self, record: &TenantRecord, why: &str) {
        self.shared.totals().overrides_not_served.add(1);
        tracing::error!(tenant = %record.id, plan = %record.plan, overrides = record.overrides.as_deref(),
            "the tenant's overrides do not fit its plan ({why}): served the plan without them until they are mended");
    }

    /// Forgets what this node holds of `tenant` (and that its id was unknown): its next request
    /// reads the directory again (after a plan change made on this node, or the tenant created,
    /// for example). Usage recorded so far is kept and billed; its leases go back at the next
    /// flush.
    pub(crate) fn invalidate_tenant(&self, tenant: &TenantId) {
        // Marked first, so that a lookup that read the directory before and finds the id
        // unknown does not remember it so (as `invalidate_key`).
        self.table.tenant_changed(tenant);
        let digest = self.table.digest(Lookup::Identity(tenant.as_str()));
        self.unknown.invalidate(&(digest.lo, digest.hi));
        self.table.evict([tenant.clone()]);
    }

    /// Forgets an API key on this node (and that it was unknown): its next request reads the
    /// directory again.
    pub(crate) fn invalidate_key(&self, key: &[u8]) {
        let digest = self.table.digest(Lookup::ApiKey(key));
        self.table.forget(digest);
        self.unknown.invalidate(&(digest.lo, digest.hi));
    }
}

/// The plan to serve a directory record with, by the one served-plan rule
/// ([`settings::plan::served`](crate::settings::plan::served)), compiled for the request path;
/// with why some or all of its overrides are not served. `Err`: the plan cannot be served (not
/// declared here), or the overrides cannot be read at all.
fn served_plan(rt: &Runtime, record: &TenantRecord) -> Result<(Arc<CompiledPlan>, Option<String>), String> {
    let served = crate::settings::plan::served(&rt.config, record).map_err(|u| u.to_string())?;
    let org = rt.org_of(&record.id);
    // Compiled as the version served: a tenant on a version the file no longer declares is
    // served the plan's current one, shared with its tenants.
    Ok((rt.compile_served(served.spec.id(), &served.spec, served.overrides.as_deref(), org), served.dropped))
}
