//! The recharges this node's refills claimed, waiting for the worker, and what charges them.

use std::{collections::VecDeque, sync::Mutex};

use crate::{
    base::{MeterId, TenantId},
    billing::Charger,
};

/// The most claims waiting for the worker on a node: past it, a claim is dropped (logged), and
/// taken again by the next refill once its delivery lapses
/// ([`CLAIM_TAKEN_SECS`](crate::store::CLAIM_TAKEN_SECS)).
const QUEUE_MAX: usize = 1024;

/// A recharge this node claimed (or took again), to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Claimed {
    pub(crate) tenant: TenantId,
    pub(crate) meter: MeterId,
    /// Its number for the tenant and meter: its payment's keys derive from it.
    pub(crate) n: u64,
    /// Packs to buy.
    pub(crate) packs: u64,
    /// What they cost (smallest unit of the currency).
    pub(crate) amount: u64,
}

/// The claims of this node waiting for the worker.
#[derive(Debug, Default)]
pub(crate) struct Recharges {
    queue: Mutex<VecDeque<Claimed>>,
    wake: tokio::sync::Notify,
    /// What charges them (none: the configuration recharges nothing, or no secret key).
    charger: std::sync::OnceLock<std::sync::Arc<Charger>>,
}

impl Recharges {
    /// Charges recharges with `charger` (set once, at build).
    pub(crate) fn charge_with(&self, charger: std::sync::Arc<Charger>) {
        let _ = self.charger.set(charger);
    }

    /// What charges recharges, if anything.
    pub(crate) fn charger(&self) -> Option<&Charger> {
        self.charger.get().map(std::sync::Arc::as_ref)
    }

    /// [`charger`](Self::charger), shared.
    pub(crate) fn charger_arc(&self) -> Option<std::sync::Arc<Charger>> {
        self.charger.get().cloned()
    }

    /// A claim the store answered this node: queued for the worker (once per recharge).
    pub(crate) fn claimed(&self, c: Claimed) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.iter().any(|q| q.n == c.n && q.tenant == c.tenant && q.meter == c.meter) {
            return;
        }
        if queue.len() >= QUEUE_MAX {
            tracing::warn!(tenant = %c.tenant, meter = %c.meter, n = c.n,
                "too many recharges waiting on this node: this one is taken again once its claim lapses");
            return;
        }
        queue.push_back(c);
        drop(queue);
        self.wake.notify_one();
    }

    /// The next claim to deliver, if any.
    pub(crate) fn next(&self) -> Option<Claimed> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
    }

    /// Waits until a claim is queued (or one was queued since the last call).
    pub(crate) async fn queued(&self) {
        self.wake.notified().await;
    }
}
