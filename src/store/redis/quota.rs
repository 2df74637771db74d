//! The quota role of the RedisStore: a tenant's quota in rows, each read, changed by the rules
//! every store applies ([`TenantQuota`]) and written back under a compare-and-set of its
//! version. A calendar period's counter (a day's, a month's) is a row of its own, so that the
//! meters and periods of one tenant never race each other; the tenant's row keeps the rest
//! (every prepaid balance, caps, recharges, credit grants) and the calendar periods each meter
//! keeps, from which a new period drops those that ended before it (their rows marked
//! dropped). A node takes one call per row at a time ([`RedisStore::turn`]); a write that
//! another node's came before is tried again from the row its answer carries, until the call's
//! deadline ([`until_won`]).
//!
//! The calendar counters an earlier layout kept in the tenant's row move to rows of their own
//! as the next call on one of them finds it missing: written first (unless there already),
//! then taken out of the tenant's row.
//!
//! A refund names a payment, and may come before its grant; a dispute names nothing else. A
//! grant first writes a hint in its payment's rows (the payment's, and its own id's): the tenant
//! it is written to. A refund goes to the tenant it names or the hints name, and is applied, or
//! kept in that tenant's row until the grant lands there: the grant and its refund meet in one
//! row, whichever comes first. A refund that names no tenant and finds no hint waits in the
//! payment's rows, which the grant's hint reads as it is written (one compare-and-set of the
//! same row: the refund comes before it, or finds it). Grants due to expire are listed in one
//! sorted set, added to before the grant is written.

use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands as _;

use super::{backend, kept_for, now_secs, secs_of, RedisStore, Row, Ttl};
use crate::{
    base::{MeterId, Period, TenantId},
    store::{
        contract::{REFUNDS_KEPT_MAX, REFUNDS_KEPT_SECS, RETENTION_SECS},
        quota::{kept_refund_json, kept_refund_of, newer_refund, CreditRefund},
        race::{until_won, Race, Retries, ATTEMPTS},
        tenant_quota::{Roll, TenantQuota},
        CapMode, CreditBalance, CreditClosure, CreditGrant, Grant, GrantOutcome, QuotaCounter, QuotaKey, QuotaStore,
        QuotaStoreExt as _, RechargeMode, RefundOutcome, Release, Reservation, StoreError,
    },
};

/// How long after a grant's delivery a dispute of its payment waits for it when the grant is not
/// in the tenant its hint names (a grant whose write failed, delivered again by Stripe for up
/// to three days): answered a conflict, so that its webhook is delivered again.
const PENDING_SECS: i64 = 3 * 86_400 + 3_600;

/// How long a payment's hint names its grant's tenant: disputes come within months of a
/// payment (120 days for most card networks); a refund names its tenant.
const HINT_KEPT_SECS: u64 = 730 * 86_400;

/// Refunds kept in one tenant's row at most (each until its grant lands, at most 35 days).
const TENANT_REFUNDS_MAX: usize = 100;

/// A due grant's member in the sorted set of grants due to expire.
fn due_member(tenant: &TenantId, meter: &MeterId, id: &str) -> String {
    serde_json::json!([tenant.as_str(), meter.as_str(), id]).to_string()
}

/// The keys a refund of a payment is kept under: its payment (or the grant's id) and its
/// invoice (the id of a grant an invoice bought).
fn payment_keys(payment: &str, other: Option<&str>) -> Vec<String> {
    let mut keys = vec![payment.to_owned()];
    if let Some(other) = other.filter(|o| *o != payment) {
        keys.push(other.to_owned());
    }
    keys
}

impl RedisStore {
    /// Runs `apply` on `tenant`'s quota and writes it back if it changed and no other call
    /// wrote it meanwhile (else reads it again); `now` is the call's time, by the caller's
    /// clock (Unix seconds), from which the row's time to live is counted.
    async fn with_quota<T: Send>(
        &self,
        tenant: &TenantId,
        now: i64,
        retries: Retries,
        apply: impl Fn(&mut TenantQuota) -> T + Sync,
    ) -> Result<T, StoreError> {
        self.with_row(tenant, now, retries, |q, _| apply(q)).await
    }

    /// [`with_quota`](Self::with_quota), with the refunds kept in the tenant's row for grants
    /// not landed yet.
    async fn with_row<T: Send>(
        &self,
        tenant: &TenantId,
        now: i64,
        retries: Retries,
        apply: impl Fn(&mut TenantQuota, &mut Vec<CreditRefund>) -> T + Sync,
    ) -> Result<T, StoreError> {
        let key = &self.keys().quota(tenant);
        self.counted(1, 0, 0);
        self.on_row(key, "a tenant's quota, written by other calls all along", retries, None, |found| {
            let read = (tenant_state(found), found.text("refunds").unwrap_or("[]"));
            let mut quota = match read.0 {
                Some(state) => TenantQuota::from_json(tenant, state).map_err(unreadable)?,
                // A row without its state: not one this store wrote (an earlier tollgate's, as
                // it rewrites a row it cannot read, or another program's).
                None if found.exists() => return Err(unreadable("no state".to_owned())),
                None => TenantQuota::default(),
            };
            let mut refunds = refunds_of(read.1).map_err(unreadable)?;
            // Kept 35 days at most: gone before anything reads them.
            refunds.retain(|r| r.at > now.saturating_sub(REFUNDS_KEPT_SECS));
            let out = apply(&mut quota, &mut refunds);
            refunds.sort_by_key(|r| std::cmp::Reverse(r.at));
            let (state, kept) = (quota.to_json(), refunds_json(&refunds));
            let same = found.text(TENANT_STATE) == Some(state.as_str()) && kept == read.1;
            if same || (!found.exists() && quota.is_empty() && refunds.is_empty()) {
                // Nothing changed (a call answered again, a refund of another tenant's): no write.
                return Ok(Step::Answer(out));
            }
            // Kept, without a time to live: a volatile-* eviction policy evicts only keys with
            // one, and a tenant's row lists the periods it dropped (docs/redis.md, "Memory and
            // eviction"). One row per tenant.
            let ttl = Ttl::Never;
            let mut fields = vec![(TENANT_STATE, state.into_bytes())];
            if !refunds.is_empty() {
                fields.push(("refunds", kept.into_bytes()));
            }
            Ok(Step::Write(out, fields, ttl))
        })
        .await
    }

    /// One call's attempts on the row at `key`, each in the row's turn on this node: `step`
    /// reads the row (as this node's last call on it left it, written or answered by a lost
    /// race, else read now) and answers, or says what to write under the row's version (a
    /// write from a row older than the server's loses, and is answered the newest). An answer
    /// without a write is trusted only from a row read now: else the row is read again.
    async fn on_row<T: Send>(
        &self,
        key: &str,
        what: &'static str,
        retries: Retries,
        first: Option<Row>,
        step: impl Fn(&Row) -> Result<Step<T>, StoreError> + Sync,
    ) -> Result<T, StoreError> {
        let step = &step;
        // `None`: read the row, whatever this node knows of it.
        until_won(what, retries, Some(first), |found: Option<Option<Row>>, _| {
            Box::pin(async move {
                let mut turn = self.turn(key).await?;
                // The row as the last call of this node on it left it is the newest this node
                // knows (a race this call lost left it there too, and later calls replaced it).
                let known = match found {
                    Some(found) => turn.take().or(found),
                    None => None,
                };
                let (row, fresh) = match known {
                    Some(row) => (row, false),
                    None => (self.read(key).await?, true),
                };
                match step(&row)? {
                    Step::Answer(out) if fresh => {
                        turn.leave(row);
                        Ok(Race::Won(out))
                    }
                    Step::Answer(_) => Ok(Race::Again(None)),
                    Step::Write(out, fields, ttl) => {
                        let fields: Vec<(&str, &[u8])> = fields.iter().map(|(n, v)| (*n, v.as_slice())).collect();
                        self.counted(0, 1, 1);
                        match self.put_or_answer(key, &row.version(), ttl, &fields).await? {
                            Ok(written) => {
                                turn.leave(written);
                                Ok(Race::Won(out))
                            }
                            Err(now) => {
                                self.lost_race();
                                turn.leave(now.clone());
                                Ok(Race::Lost(Some(Some(now))))
                            }
                        }
                    }
                }
            })
        })
        .await
    }

    /// The row at `key`, counted as a quota call's read. A row not there makes this node
    /// check that the server did not lose every key ([`check_layout`](Self::check_layout)).
    async fn read(&self, key: &str) -> Result<Row, StoreError> {
        self.counted(0, 0, 1);
        let row = self.row(key).await?;
        if !row.exists() {
            self.check_layout().await;
        }
        Ok(row)
    }

    /// Runs `apply` on the counter of `key`, a calendar period's, in its own row (with the
    /// tenant's cap on the meter, as its row holds it when the call starts, when `with_cap`),
    /// and writes it back as [`with_row`](Self::with_row) does. A counter not there yet is
    /// made: its period listed in the tenant's row first ([`roll`](Self::roll)); a period
    /// dropped changes nothing.
    async fn with_counter<T: Send>(
        &self,
        key: &QuotaKey,
        now: i64,
        retries: Retries,
        with_cap: bool,
        apply: impl Fn(&mut TenantQuota) -> T + Sync,
    ) -> Result<T, StoreError> {
        self.counted(1, 0, 0);
        let row_key = &self.keys().counter(key);
        let apply = &apply;
        let cap = match with_cap {
            true => self.read_quota(&key.tenant).await?.cap(&key.meter),
            false => None,
        };
        let mut rolled = false;
        loop {
            // Once its period is listed, its row is taken as absent (a write that finds it made
            // meanwhile answers it).
            let first = rolled.then(Row::default);
            let answer = self
                .on_row(row_key, "a counter, written by other nodes all along", retries, first, |found| {
                    if !found.exists() && !rolled {
                        return Ok(Step::Answer(None));
                    }
                    let dropped = found.text("dropped").is_some();
                    let mut view =
                        TenantQuota::one_counter(key, found.text("state"), cap, dropped).map_err(unreadable)?;
                    let out = apply(&mut view);
                    Ok(match view.counter_json(key) {
                        Some(state) if !dropped && found.text("state") != Some(state.as_str()) => {
                            Step::Write(Some(out), vec![("state", state.into_bytes())], counter_ttl(now, key))
                        }
                        // Dropped, or nothing changed (a call answered again): no write.
                        _ => Step::Answer(Some(out)),
                    })
                })
                .await?;
            if let Some(out) = answer {
                return Ok(out);
            }
            if self.roll(key, now).await? == Roll::Dropped {
                let mut view = TenantQuota::one_counter(key, None, cap, true).map_err(unreadable)?;
                return Ok(apply(&mut view));
            }
            rolled = true;
        }
    }

    /// Lists `key`'s period in the tenant's row (dropping the periods of its meter that ended
    /// before it started), unless listed or dropped already. The periods it ends are marked
    /// dropped in their rows first: a roll of `key` ends them whenever it lands, and a call on
    /// one of them after this finds it dropped, whatever becomes of this call. The calendar
    /// counters an earlier layout kept in the tenant's row move to rows of their own first.
    async fn roll(&self, key: &QuotaKey, now: i64) -> Result<Roll, StoreError> {
        let tenant = &key.tenant;
        // Every node of a tenant makes its new period at once: one lists it, the others find
        // it listed in the row its lost race answers.
        let retries = Retries::FROM_ANSWER;
        let mut moved: Vec<(QuotaKey, String)> = Vec::new();
        let mut marked: Vec<QuotaKey> = Vec::new();
        for _ in 0..ATTEMPTS {
            let rolled = self
                .with_quota(tenant, now, retries, |q| {
                    let inline = q.inline_calendar();
                    if inline.iter().any(|(k, state)| moved.iter().any(|(m, was)| m == k && was != state)) {
                        // Changed in the tenant's row since it was moved: a tollgate of layout 1
                        // still counts there. Refused, not taken out (its units would be lost).
                        return Err(Before::Mixed);
                    }
                    if inline.iter().any(|(k, _)| !moved.iter().any(|(m, _)| m == k)) {
                        // Counters kept here by an earlier layout: each written to its own row
                        // first (below), then taken out of this one.
                        return Err(Before::Move(inline));
                    }
                    // Moved (their rows written): taken out, and listed, in this write.
                    q.take_calendar();
                    let ending = q.ending(key);
                    if ending.iter().any(|k| !marked.contains(k)) {
                        return Err(Before::Drop(ending));
                    }
                    Ok(q.roll(key))
                })
                .await?;
            match rolled {
                Ok(rolled) => return Ok(rolled),
                Err(Before::Move(inline)) => {
                    for (k, state) in inline {
                        // Unless there already: a counter's row, once written, is the counter
                        // (the copy in the tenant's row is stale).
                        let ttl = counter_ttl(now, &k);
                        self.counted(0, 1, 1);
                        let _ =
                            self.put_or_read(&self.keys().counter(&k), "", ttl, &[("state", state.as_bytes())]).await?;
                        moved.push((k, state));
                    }
                }
                Err(Before::Mixed) => {
                    return Err(StoreError::Conflict(
                        "a tenant's calendar counters, still written in its row by a tollgate of layout 1",
                    ))
                }
                Err(Before::Drop(ending)) => {
                    for k in ending {
                        self.mark_dropped(&k).await?;
                        marked.push(k);
                    }
                }
            }
        }
        Err(StoreError::Conflict("a tenant's quota, its calendar counters moving out all along"))
    }

    /// Marks the row of `key`'s counter dropped (kept 35 days, a minute's an hour: later calls
    /// for it change nothing).
    async fn mark_dropped(&self, key: &QuotaKey) -> Result<(), StoreError> {
        let row_key = &self.keys().counter(key);
        self.counted(1, 0, 0);
        let ttl = Ttl::For(Duration::from_secs(ended_kept_secs(key) as u64));
        self.on_row(row_key, "a dropped counter's row", Retries::FROM_ANSWER, None, |found| {
            Ok(match found.text("dropped") {
                Some(_) => Step::Answer(()),
                None => Step::Write((), vec![("dropped", b"1".to_vec())], ttl),
            })
        })
        .await
    }

    /// `tenant`'s quota as stored, counted as a quota call's read.
    async fn read_quota(&self, tenant: &TenantId) -> Result<TenantQuota, StoreError> {
        self.counted(0, 0, 1);
        self.quota_of(tenant).await
    }

    /// `tenant`'s quota as stored.
    async fn quota_of(&self, tenant: &TenantId) -> Result<TenantQuota, StoreError> {
        let found = self.row(&self.keys().quota(tenant)).await?;
        if !found.exists() {
            return Ok(TenantQuota::default());
        }
        TenantQuota::from_json(tenant, tenant_state(&found).unwrap_or("")).map_err(unreadable)
    }

    /// The refund kept in a payment's row, if any.
    fn kept_in(row: &Row) -> Option<CreditRefund> {
        row.text("refund").and_then(kept_refund_of)
    }

    /// The tenant a payment's row says its grant is written to, and since when.
    fn hint_in(row: &Row) -> Option<(TenantId, i64)> {
        Some((row.text("tenant")?.into(), row.int("at").ok().flatten().unwrap_or(0)))
    }

    /// Before `grant` is written: each of its payment's rows names its tenant (a hint). The
    /// refunds waiting there, the newest: the grant applies it as it lands.
    async fn hint_payment(&self, grant: &CreditGrant) -> Result<Option<CreditRefund>, StoreError> {
        let payment = grant.payment.as_deref().unwrap_or(&grant.id);
        let mut kept: Option<CreditRefund> = None;
        for k in payment_keys(payment, Some(&grant.id)) {
            let key = &self.keys().payment(&k);
            let found =
                until_won("a payment's row, written by its refunds all along", Retries::BACKING_OFF, (), |(), _| {
                    Box::pin(async move {
                        let found = self.row(key).await?;
                        let at = grant.granted_at.to_string();
                        let mut fields: Vec<(&str, &[u8])> =
                            vec![("tenant", grant.tenant.as_str().as_bytes()), ("at", at.as_bytes())];
                        // A refund waiting there stays (this grant's write may fail), while it is kept.
                        let waiting = Self::kept_in(&found)
                            .is_some_and(|r| r.at > grant.granted_at.saturating_sub(REFUNDS_KEPT_SECS));
                        if let Some(r) = found.bytes("refund").filter(|_| waiting) {
                            fields.push(("refund", r));
                        }
                        // Kept as long as a dispute of the payment may come.
                        let ttl = Ttl::For(Duration::from_secs(HINT_KEPT_SECS));
                        match self.put(key, &found.version(), ttl, &fields).await? {
                            true => Ok(Race::Won(found)),
                            false => Ok(Race::Lost(())),
                        }
                    })
                })
                .await?;
            if let Some(r) = Self::kept_in(&found) {
                kept = Some(match kept {
                    Some(before) => newer_refund(before, r),
                    None => r,
                });
            }
        }
        Ok(kept)
    }

    /// Counts a refund kept against the day's share of [`REFUNDS_KEPT_MAX`]: whether it fits
    /// (else nothing is counted).
    async fn count_kept(&self, at: i64) -> Result<Option<String>, StoreError> {
        let per_day = (REFUNDS_KEPT_MAX as u64).div_ceil((REFUNDS_KEPT_SECS / 86_400) as u64);
        let day_key = self.keys().refunds_kept(at.div_euclid(86_400));
        let mut conn = self.conn.clone();
        // Made with its time to live, then counted (INCR keeps it): two commands of one key
        // each, never a transaction (one a cluster would refuse while the key's slot moves).
        let ttl = u64::try_from(REFUNDS_KEPT_SECS + 86_400).unwrap_or(u64::MAX);
        let _: Option<String> = redis::cmd("SET")
            .arg(&day_key)
            .arg(0)
            .arg("EX")
            .arg(ttl)
            .arg("NX")
            .query_async(&mut conn)
            .await
            .map_err(|e| backend(&e))?;
        let n: u64 = conn.incr(&day_key, 1).await.map_err(|e| backend(&e))?;
        if n > per_day {
            self.uncount(Some(&day_key)).await;
            return Ok(None);
        }
        Ok(Some(day_key))
    }

    /// Takes back the count of a refund not kept after all.
    async fn uncount(&self, day_key: Option<&str>) {
        if let Some(day_key) = day_key {
            let mut conn = self.conn.clone();
            let _: redis::RedisResult<i64> = conn.decr(day_key, 1).await;
        }
    }

    /// Keeps `refund`, which names no tenant and found no hint, in its payment's rows until a
    /// grant's hint reads it, on the condition that each is as `read` (no hint written
    /// meanwhile): `None` when one changed (read again).
    async fn keep_in_payment(
        &self,
        refund: &CreditRefund,
        read: &[(String, Row)],
    ) -> Result<Option<RefundOutcome>, StoreError> {
        let counted = match read.iter().any(|(_, row)| Self::kept_in(row).is_none()) {
            true => match self.count_kept(refund.at).await? {
                Some(day_key) => Some(day_key),
                None => return Ok(Some(RefundOutcome::Full)),
            },
            false => None,
        };
        for (key, row) in read {
            let kept = match Self::kept_in(row) {
                Some(before) => newer_refund(before, refund.clone()),
                None => refund.clone(),
            };
            let json = kept_refund_json(&kept);
            let ttl = Ttl::For(kept_for(refund.at, kept.at.saturating_add(REFUNDS_KEPT_SECS)));
            match self.put(key, &row.version(), ttl, &[("refund", json.as_bytes())]).await {
                Ok(true) => {}
                Ok(false) => {
                    self.uncount(counted.as_deref()).await;
                    return Ok(None);
                }
                Err(e) => {
                    self.uncount(counted.as_deref()).await;
                    return Err(e);
                }
            }
        }
        Ok(Some(RefundOutcome::Kept))
    }
}

/// A tenant's row that does not read: not one this store wrote.
fn unreadable(e: String) -> StoreError {
    StoreError::Unusable(format!("redis: a tenant's quota does not read ({e})"))
}

/// The rows a batch of releases writes at once.
const RELEASE_ROWS_AT_ONCE: usize = 8;

/// What one attempt on a row comes to ([`RedisStore::on_row`]).
enum Step<T> {
    /// The call's answer, nothing written.
    Answer(T),
    /// The call's answer once these fields are written (the row's whole), kept so long.
    Write(T, Vec<(&'static str, Vec<u8>)>, Ttl),
}

/// What a roll does before it lists its period ([`RedisStore::roll`]).
enum Before {
    /// Moves these counters, kept in the tenant's row by an earlier layout, to their rows.
    Move(Vec<(QuotaKey, String)>),
    /// Marks these periods dropped.
    Drop(Vec<QuotaKey>),
    /// Refuses: a counter moved changed in the tenant's row since (an earlier tollgate).
    Mixed,
}

/// The field of the tenant's row that holds its quota: `quota` (layout 1 wrote `state`, which
/// is read as well; a tollgate of layout 1 cannot read a row this one wrote, and refuses it
/// rather than write over it).
const TENANT_STATE: &str = "quota";

/// The tenant's quota as its row holds it (`None`: the row holds none).
fn tenant_state(row: &Row) -> Option<&str> {
    row.text(TENANT_STATE).or_else(|| row.text("state"))
}

/// How long the row of a calendar period's counter ending at `end` is kept, written at `now`:
/// without a time to live while the period runs (a volatile-* eviction policy evicts only keys
/// with one: a counter evicted would start again from zero); once it ended, by `now` (the
/// caller's clock), 35 days past the end and never sooner than 35 days after the write (a call
/// on a period long over must not see the row vanish under the next). A period's row not
/// written after its end keeps no time to live until a period of its meter that started more
/// than [`ENDED_PERIODS_KEPT_SECS`](crate::store::contract::ENDED_PERIODS_KEPT_SECS) after it
/// ended is made, which marks it dropped with one: a tenant keeps at most two counters without
/// one per meter and kind of period (twelve of minutes), and its quota row.
///
/// A minute's row is kept an hour, not 35 days ([`ended_kept_secs`]).
fn counter_ttl(now: i64, key: &QuotaKey) -> Ttl {
    let kept = ended_kept_secs(key);
    match key.end > now {
        true => Ttl::Never,
        false => Ttl::For(kept_for(now, key.end.saturating_add(kept)).max(Duration::from_secs(kept as u64))),
    }
}

/// How long a counter's row is kept once its period ended: 35 days, but an hour for a minute
/// (a tenant's minutes would otherwise keep 50,400 rows per meter). A late call on a period
/// dropped is refused by the tenant's row (its periods dropped before), whatever its counter's
/// row still holds; an hour outlives any call in flight by far.
fn ended_kept_secs(key: &QuotaKey) -> i64 {
    match key.period {
        crate::base::Period::Minute => 3_600,
        _ => RETENTION_SECS,
    }
}

/// The refunds kept in a tenant's row, as written there.
fn refunds_json(refunds: &[CreditRefund]) -> String {
    serde_json::Value::Array(refunds.iter().map(|r| serde_json::Value::String(kept_refund_json(r))).collect())
        .to_string()
}

/// A quota call's times moved `ahead` seconds, onto the server's clock: the time its sender
/// is known by, and its reservation's expiry (0, never, stays). Its period is the caller's.
fn on_server<C>(
    mut call: C,
    ahead: i64,
    times: impl FnOnce(&mut C) -> (&mut crate::store::ReserveToken, &mut i64),
) -> C {
    let (token, expires_at) = times(&mut call);
    *token = token.at(token.at.saturating_add(ahead));
    if *expires_at != 0 {
        *expires_at = expires_at.saturating_add(ahead);
    }
    call
}

/// [`refunds_json`] read back.
fn refunds_of(json: &str) -> Result<Vec<CreditRefund>, String> {
    let list: Vec<String> = serde_json::from_str(json).map_err(|e| e.to_string())?;
    list.iter().map(|r| kept_refund_of(r).ok_or_else(|| "a kept refund".to_owned())).collect()
}

/// Whether a refund kept for a grant is of `grant`'s payment.
fn kept_for_grant(refund: &CreditRefund, grant: &CreditGrant) -> bool {
    let payment = grant.payment.as_deref().unwrap_or(&grant.id);
    refund.payment == payment || refund.payment == grant.id || refund.invoice.as_deref() == Some(grant.id.as_str())
}

#[async_trait]
impl QuotaStore for RedisStore {
    async fn reserve(&self, r: &Reservation) -> Result<Grant, StoreError> {
        // A recharge's outcome as its webhook tells it (paid, failed, stopped) or a setting
        // stored: a money write, waited for by the replicas asked for. (A watch, which may
        // claim a recharge, is the request path's: not waited for.)
        if !matches!(r.recharge, RechargeMode::Ignored | RechargeMode::Watch { .. }) {
            if let Some(money) = self.for_money() {
                let grant = money.reserve(r).await?;
                self.replicated().await?;
                return Ok(grant);
            }
        }
        // On the server's clock: a reservation's expiry, and the time its sender is known by
        // (a call sent again keeps its first time). The rows' times to live and the period's
        // roll read the caller's time (`at`), as the period's bounds are its.
        let at = r.token.at;
        let ahead = self.ahead_of(r.sent).await?;
        let r = &on_server(r.clone(), ahead, |r| (&mut r.token, &mut r.expires_at));
        // Every node of a busy tenant writes its counter: each race lost is another's call done.
        let retries = Retries::FROM_ANSWER;
        // A sender that keeps units of the row and finds nothing of it: the row was lost.
        let claims = r.kept.lease.saturating_add(r.kept.held) > 0;
        let lost = std::sync::atomic::AtomicBool::new(false);
        let seen = |q: &TenantQuota| lost.store(claims && !q.holds(&r.key), std::sync::atomic::Ordering::Relaxed);
        let said = |grant: Grant| {
            if lost.load(std::sync::atomic::Ordering::Relaxed) {
                self.lost_row(&r.key);
            }
            grant
        };
        if r.key.period == Period::Prepaid {
            let grant = self
                .with_quota(&r.key.tenant, at, retries, |q| {
                    seen(q);
                    q.reserve(r)
                })
                .await?;
            return Ok(said(grant));
        }
        if let CapMode::Set(cap) = r.cap {
            // Stored first in the tenant's row (the same write when sent again), then read by
            // the reserve of the counter.
            let meter = &r.key.meter;
            self.with_quota(&r.key.tenant, at, Retries::BACKING_OFF, |q| q.set_cap(meter, cap)).await?;
        }
        let mut counted = r.clone();
        counted.recharge = RechargeMode::Ignored;
        let grant = self
            .with_counter(&r.key, at, retries, r.cap != CapMode::Ignored, |q| {
                seen(q);
                q.reserve(&counted)
            })
            .await?;
        let grant = said(grant);
        if r.recharge == RechargeMode::Ignored {
            return Ok(grant);
        }
        // A recharge watches the meter's prepaid balance, in the tenant's row (a watch that
        // fails is said, and the reserve answered, as on every store).
        let seen = self.apply_recharge(&r.key.tenant, &r.key.meter, r.recharge.clone(), at).await;
        Ok(grant.with_recharge(crate::store::quota::recharge_after(r, seen)?))
    }

    async fn release(&self, releases: &[Release]) -> Vec<Result<(), StoreError>> {
        use futures_util::StreamExt as _;
        // On the server's clock, as a reserve is; the rows' times to live read the callers'.
        if releases.is_empty() {
            return Vec::new();
        }
        let callers = releases;
        let server = match self.server_now().await {
            Ok(server) => server,
            Err(e) => return releases.iter().map(|_| Err(e.duplicate())).collect(),
        };
        let moved: Vec<Release> = releases
            .iter()
            .map(|r| {
                let ahead = server.map_or(0, |now| secs_of(now.saturating_sub(r.sent.saturating_mul(1_000_000_000))));
                on_server(r.clone(), ahead, |r| (&mut r.token, &mut r.expires_at))
            })
            .collect();
        let releases = &moved[..];
        // One write per row for all of its releases in the batch: the tenant's (prepaid
        // balances) or a calendar counter's; a few rows at once (they do not depend on each
        // other, and a node's calls on one row take turns).
        let row = |r: &Release| match r.key.period {
            Period::Prepaid => (r.key.tenant.clone(), None),
            _ => (r.key.tenant.clone(), Some(r.key.clone())),
        };
        let mut rows: Vec<(TenantId, Option<QuotaKey>)> = Vec::new();
        for r in releases {
            let r = row(r);
            if !rows.contains(&r) {
                rows.push(r);
            }
        }
        let row = &row;
        let written: Vec<(Vec<usize>, Result<(), StoreError>)> =
            futures_util::stream::iter(rows.into_iter().map(|(tenant, counter)| async move {
                let mine: Vec<usize> =
                    (0..releases.len()).filter(|i| row(&releases[*i]) == (tenant.clone(), counter.clone())).collect();
                let retries = Retries::FROM_ANSWER;
                let now = mine.iter().map(|i| callers[*i].token.at).max().unwrap_or_else(now_secs);
                // A release of units taken from a row that holds nothing: the row was lost
                // (said once per key and call, as the last attempt found it).
                let lost = std::sync::Mutex::new(Vec::<QuotaKey>::new());
                let released = |q: &mut TenantQuota| {
                    let mut gone = lost.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    gone.clear();
                    for i in &mine {
                        let r = &releases[*i];
                        let claims = r.units.saturating_add(r.kept.lease).saturating_add(r.kept.held) > 0;
                        if claims && !q.holds(&r.key) && !gone.contains(&r.key) {
                            gone.push(r.key.clone());
                        }
                    }
                    for i in &mine {
                        q.release(&releases[*i]);
                    }
                };
                let written = match &counter {
                    None => self.with_quota(&tenant, now, retries, released).await,
                    Some(key) => self.with_counter(key, now, retries, false, released).await,
                };
                if written.is_ok() {
                    for key in lost.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
                        self.lost_row(&key);
                    }
                }
                (mine, written)
            }))
            .buffer_unordered(RELEASE_ROWS_AT_ONCE)
            .collect()
            .await;
        let mut out: Vec<Result<(), StoreError>> = releases.iter().map(|_| Ok(())).collect();
        for (mine, written) in written {
            if let Err(e) = written {
                for i in &mine {
                    out[*i] = Err(e.duplicate());
                }
            }
        }
        out
    }

    async fn grant_credits(&self, grant: &CreditGrant) -> Result<GrantOutcome, StoreError> {
        // On money writes' own connection, then waited for by the replicas asked for.
        if let Some(money) = self.for_money() {
            let outcome = money.grant_credits(grant).await?;
            self.replicated().await?;
            return Ok(outcome);
        }
        // Its tenant hinted in its payment's rows first, the refunds waiting there read.
        let outside = self.hint_payment(grant).await?;
        let due = self.keys().credits_due();
        let member = due_member(&grant.tenant, &grant.meter, &grant.id);
        let mut conn = self.conn.clone();
        if let Some(at) = grant.expires_at {
            // Listed before it is written (the list may name a grant that is not, never the
            // other way round); a grant listed already keeps its time until it is written.
            let _: i64 = redis::cmd("ZADD")
                .arg(&due)
                .arg("NX")
                .arg(at)
                .arg(&member)
                .query_async(&mut conn)
                .await
                .map_err(|e| backend(&e))?;
        }
        // With the refunds kept in its tenant's row for it: applied in the grant's own write.
        let retries = Retries::BACKING_OFF.attempts(2 * ATTEMPTS);
        let outcome = self
            .with_row(&grant.tenant, grant.granted_at, retries, |q, refunds| {
                let kept = refunds
                    .iter()
                    .filter(|r| kept_for_grant(r, grant))
                    .cloned()
                    .chain(outside.clone())
                    .reduce(newer_refund);
                let outcome = q.grant(grant, kept.as_ref());
                if matches!(outcome, GrantOutcome::Granted(_)) {
                    refunds.retain(|r| !kept_for_grant(r, grant));
                }
                outcome
            })
            .await?;
        match &outcome {
            GrantOutcome::Granted(_) => {
                if let Some(at) = grant.expires_at {
                    let _: i64 = conn.zadd(&due, &member, at).await.map_err(|e| backend(&e))?;
                }
            }
            GrantOutcome::Duplicate(seen) => {
                // Listed as it was written (a delivery again may carry a later expiry).
                let seen_member = due_member(&seen.tenant, &seen.meter, &seen.id);
                if grant.expires_at.is_some() && seen_member != member {
                    let _: i64 = conn.zrem(&due, &member).await.map_err(|e| backend(&e))?;
                }
                if let (Some(at), None) = (seen.expires_at, seen.closed) {
                    let _: i64 = conn.zadd(&due, seen_member, at).await.map_err(|e| backend(&e))?;
                }
            }
            _ => {
                if grant.expires_at.is_some() {
                    let _: i64 = conn.zrem(&due, &member).await.map_err(|e| backend(&e))?;
                }
            }
        }
        Ok(match outcome {
            GrantOutcome::Granted(_) => {
                let q = self.quota_of(&grant.tenant).await?;
                let (_, balances) = q.grants(&grant.tenant, Some(&grant.meter));
                GrantOutcome::Granted(balances.into_iter().next().map_or_else(CreditBalance::default, |(_, b)| b))
            }
            other => other,
        })
    }

    async fn credit_grants(
        &self,
        tenant: &TenantId,
        meter: Option<&MeterId>,
    ) -> Result<(Vec<CreditGrant>, Vec<(MeterId, CreditBalance)>), StoreError> {
        Ok(self.quota_of(tenant).await?.grants(tenant, meter))
    }

    async fn close_credits(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
        id: &str,
        revoke: bool,
        now: i64,
    ) -> Result<Option<CreditClosure>, StoreError> {
        if let Some(money) = self.for_money() {
            let closed = money.close_credits(tenant, meter, id, revoke, now).await?;
            self.replicated().await?;
            return Ok(closed);
        }
        let retries = Retries::BACKING_OFF.attempts(2 * ATTEMPTS);
        let closed = self.with_quota(tenant, now, retries, |q| q.close(tenant, meter, id, revoke, now)).await?;
        if closed.is_some() {
            let mut conn = self.conn.clone();
            let _: i64 =
                conn.zrem(self.keys().credits_due(), due_member(tenant, meter, id)).await.map_err(|e| backend(&e))?;
        }
        Ok(closed)
    }

    async fn refund_credits(&self, refund: &CreditRefund) -> Result<RefundOutcome, StoreError> {
        if let Some(money) = self.for_money() {
            let outcome = money.refund_credits(refund).await?;
            self.replicated().await?;
            return Ok(outcome);
        }
        let keys = payment_keys(&refund.payment, refund.invoice.as_deref());
        let keys = &keys;
        let retries = Retries::BACKING_OFF.attempts(2 * ATTEMPTS);
        until_won("a refund raced with its grant under every attempt", retries, (), |(), _| {
            Box::pin(async move {
                let mut read = Vec::with_capacity(keys.len());
                for k in keys {
                    let key = self.keys().payment(k);
                    let row = self.row(&key).await?;
                    read.push((key, row));
                }
                let hints: Vec<(TenantId, i64)> = read.iter().filter_map(|(_, row)| Self::hint_in(row)).collect();
                // The tenant that paid first, then those the hints name: an open grant of the
                // payment in any of them first, then a closed one.
                let mut tenants: Vec<TenantId> = refund.tenant.iter().cloned().collect();
                for (t, _) in &hints {
                    if !tenants.contains(t) {
                        tenants.push(t.clone());
                    }
                }
                for tenant in &tenants {
                    if let Some(outcome) = self.with_quota(tenant, refund.at, retries, |q| q.refund(refund)).await? {
                        return Ok(Race::Won(outcome));
                    }
                }
                for tenant in &tenants {
                    if self.quota_of(tenant).await?.has_grant_of(refund) {
                        return Ok(Race::Won(RefundOutcome::Nothing));
                    }
                }
                if !refund.kept() {
                    // A dispute: its grant hinted and not written yet (delivered again by
                    // Stripe for up to three days) is waited for.
                    if hints.iter().any(|(_, at)| *at > refund.at.saturating_sub(PENDING_SECS)) {
                        return Err(StoreError::Conflict("a grant of the payment is being written"));
                    }
                    return Ok(Race::Won(RefundOutcome::Unknown));
                }
                let Some((hinted, _)) = hints.first() else {
                    // No grant hinted: kept in the payment's rows, as read (a grant's hint reads
                    // it there, or makes this write fail and the refund read again).
                    return Ok(match self.keep_in_payment(refund, &read).await? {
                        Some(outcome) => Race::Won(outcome),
                        None => Race::Lost(()),
                    });
                };
                // Its grant is being written to the tenant hinted: kept in that tenant's row,
                // where the grant applies it as it lands (or applied now, if it landed).
                let Some(day_key) = self.count_kept(refund.at).await? else {
                    return Ok(Race::Won(RefundOutcome::Full));
                };
                let kept = self
                    .with_row(hinted, refund.at, retries, |q, refunds| {
                        if let Some(outcome) = q.refund(refund) {
                            return (outcome, false);
                        }
                        if q.has_grant_of(refund) {
                            return (RefundOutcome::Nothing, false);
                        }
                        if let Some(i) = refunds.iter().position(|r| r.payment == refund.payment) {
                            let before = refunds.remove(i);
                            refunds.push(newer_refund(before, refund.clone()));
                            return (RefundOutcome::Kept, false);
                        }
                        if refunds.len() >= TENANT_REFUNDS_MAX {
                            return (RefundOutcome::Full, false);
                        }
                        refunds.push(refund.clone());
                        (RefundOutcome::Kept, true)
                    })
                    .await;
                match kept {
                    Ok((outcome, new)) => {
                        if !new {
                            self.uncount(Some(&day_key)).await;
                        }
                        Ok(Race::Won(outcome))
                    }
                    Err(e) => {
                        self.uncount(Some(&day_key)).await;
                        Err(e)
                    }
                }
            })
        })
        .await
    }

    async fn values(
        &self,
        call: &crate::store::ValueCall,
        mode: crate::store::ValueMode,
    ) -> Result<crate::store::HeldValues, StoreError> {
        self.apply_values(call, mode).await
    }

    async fn payments(
        &self,
        call: &crate::store::PaymentCall,
        now: i64,
    ) -> Result<crate::store::PaymentAnswer, StoreError> {
        use crate::store::{
            race::{until_won, Race, Retries},
            PaymentCall, PaymentRow,
        };
        // One row without a time to live (never evicted under a `volatile-*` policy), read and
        // written back under a compare-and-set of its version.
        let key = &self.keys().payments(call.tenant());
        if matches!(call, PaymentCall::Read { .. }) {
            let found = self.row(key).await?;
            return PaymentRow::apply_json(found.text("row"), call, now).map(|(answer, _)| answer);
        }
        until_won("a tenant's payments, written by several webhooks at once", Retries::BACKING_OFF, (), |(), _| {
            Box::pin(async move {
                let found = self.row(key).await?;
                let (answer, row) = PaymentRow::apply_json(found.text("row"), call, now)?;
                let Some(row) = row else { return Ok(Race::Won(answer)) };
                match self.put(key, &found.version(), super::Ttl::Never, &[("row", row.as_bytes())]).await? {
                    true => Ok(Race::Won(answer)),
                    false => Ok(Race::Lost(())),
                }
            })
        })
        .await
    }

    async fn counters(&self, tenant: &TenantId, meter: &MeterId) -> Result<Vec<QuotaCounter>, StoreError> {
        let mut q = self.quota_of(tenant).await?;
        for key in q.listed(meter).to_vec() {
            if let Some(state) = self.row(&self.keys().counter(&key)).await?.text("state") {
                q.add_counter(&key, state).map_err(unreadable)?;
            }
        }
        Ok(q.counters(tenant, meter))
    }

    async fn expired_credits(&self, now: i64, limit: usize) -> Result<Vec<CreditGrant>, StoreError> {
        /// Pages of the due list read at most, per call.
        const PAGES: usize = 8;
        let mut conn = self.conn.clone();
        let due_key = self.keys().credits_due();
        let page = limit.saturating_mul(2).max(16);
        let mut out: Vec<CreditGrant> = Vec::new();
        let mut read: std::collections::HashMap<TenantId, Option<TenantQuota>> = std::collections::HashMap::new();
        let mut offset = 0;
        for _ in 0..PAGES {
            let listed: Vec<String> = redis::cmd("ZRANGE")
                .arg(&due_key)
                .arg("-inf")
                .arg(now)
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(offset)
                .arg(page)
                .query_async(&mut conn)
                .await
                .map_err(|e| backend(&e))?;
            let len = listed.len();
            // Entries taken off the list (or listed later) this page: the next starts that much
            // earlier.
            let mut gone = 0;
            for member in listed {
                let named: Option<(String, String, String)> = serde_json::from_str(&member).ok();
                let Some((t, m, id)) = named else {
                    let _: i64 = conn.zrem(&due_key, &member).await.map_err(|e| backend(&e))?;
                    gone += 1;
                    continue;
                };
                let tenant = TenantId::from(t.as_str());
                if !read.contains_key(&tenant) {
                    let q = match self.quota_of(&tenant).await {
                        Ok(q) => Some(q),
                        Err(StoreError::Unusable(e)) => {
                            tracing::error!(tenant = %tenant, error = %e, "a tenant's quota on Redis does not read: its grants are not expired");
                            None
                        }
                        Err(e) => return Err(e),
                    };
                    read.insert(tenant.clone(), q);
                }
                let Some(q) = &read[&tenant] else { continue };
                let (grants, _) = q.grants(&tenant, Some(&MeterId::from(m.as_str())));
                match grants.into_iter().find(|g| g.id == id) {
                    Some(g) if g.closed.is_none() => match g.expires_at {
                        Some(at) if at <= now => {
                            if !out.iter().any(|o| o.tenant == g.tenant && o.meter == g.meter && o.id == g.id) {
                                out.push(g);
                            }
                        }
                        // Listed at another time than it expires: listed again, at its own.
                        Some(at) => {
                            let _: i64 = conn.zadd(&due_key, &member, at).await.map_err(|e| backend(&e))?;
                            gone += 1;
                        }
                        None => {
                            let _: i64 = conn.zrem(&due_key, &member).await.map_err(|e| backend(&e))?;
                            gone += 1;
                        }
                    },
                    // Closed: no longer due.
                    Some(_) => {
                        let _: i64 = conn.zrem(&due_key, &member).await.map_err(|e| backend(&e))?;
                        gone += 1;
                    }
                    // Not written an hour past its listed expiry: its write failed.
                    None => {
                        let score: Option<f64> = conn.zscore(&due_key, &member).await.map_err(|e| backend(&e))?;
                        if score.is_some_and(|s| (s as i64) < now - 3_600) {
                            let _: i64 = conn.zrem(&due_key, &member).await.map_err(|e| backend(&e))?;
                            gone += 1;
                        }
                    }
                }
                if out.len() >= limit {
                    break;
                }
            }
            if out.len() >= limit || len < page {
                break;
            }
            offset += len - gone;
        }
        out.sort_by_key(|g| g.expires_at);
        out.truncate(limit);
        Ok(out)
    }
}

#[cfg(any(test, feature = "test-util"))]
#[async_trait]
impl crate::store::QuotaInspect for RedisStore {
    async fn reserved(&self, key: &crate::store::QuotaKey) -> Result<u64, StoreError> {
        if key.period != Period::Prepaid {
            let row = self.row(&self.keys().counter(key)).await?;
            if row.text("dropped").is_some() {
                return Ok(0);
            }
            if let Some(state) = row.text("state") {
                return Ok(TenantQuota::one_counter(key, Some(state), None, false).map_err(unreadable)?.reserved(key));
            }
        }
        // A prepaid balance, or a counter an earlier layout kept in the tenant's row.
        Ok(self.quota_of(&key.tenant).await?.reserved(key))
    }
}
