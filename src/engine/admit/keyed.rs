//! The `Idempotency-Key` stage of admission: a request with a key is checked against this
//! node's memory of keys ([`Idempotency`](super::idempotency::Idempotency)); a key the node has
//! not seen is claimed in the store (one conditional write, only for a request within its
//! rate); a key already answered is replayed from the stored response without charging; a key
//! in flight or used for another request is refused (409, 422). Once claimed, the request goes
//! on through the decision chain (`admission.rs`).

use std::sync::Arc;

use crate::engine::admit::{
    charge::RateCharge,
    gate::Gate,
    idempotency::{settled, CaptureLimits, Claim, FleetClaim, Idempotency, NotStored, Verdict, IN_FLIGHT_SECS},
    stage::{ClaimPlace, Decision, KeyClaim, ReplayRead, Stage},
    ticket::{Held, Pass},
};
use crate::{
    config::StoreErrorPolicy,
    plan::{RouteCost, Runtime},
    response::{Rejection, RejectionKind},
    store::{IdempotencyClaim, IdempotencyState, StoredResponse},
    tenant::{Slot, Tenant},
};

impl Gate {
    /// A request with an `Idempotency-Key` (`key`, bound to the request's fingerprint
    /// `request`), after its feature and fleet checks: its key's verdict on this node decides
    /// what comes next.
    #[cold]
    #[inline(never)]
    pub(super) fn decide_key(&self, charge: RateCharge, route: RouteCost, key: &[u8], request: u128) -> Decision {
        let state = charge.state();
        match self.idempotency.check(&state.id, key, request) {
            // A key this node has not seen: the store has the fleet's answer.
            Verdict::First(claim) => self.first_key(charge, route, claim, key, request),
            // Answered with the stored response (one store read), after the rate check.
            Verdict::Replay => self.replay_key(charge, route, key, request),
            // Refused before the rate check (cells taken from a fleet lease go back with the
            // charge).
            Verdict::InFlight => self.reject(Self::key_in_use(state)),
            Verdict::Mismatch => self.reject(Self::key_mismatch(state)),
        }
    }

    /// A key this node has not seen, for a request that passed its feature check: the store is
    /// asked (one conditional write) only for a request within its rate, so a caller over its
    /// rate costs no store write.
    #[cold]
    #[inline(never)]
    fn first_key(&self, mut charge: RateCharge, route: RouteCost, claim: Claim, key: &[u8], request: u128) -> Decision {
        if let Err(r) = self.check_rate(&mut charge, &route) {
            drop(claim);
            return self.reject(r);
        }
        match self.claim_stage(charge, claim, key.into(), request, route.meter) {
            Ok((c, false)) => Decision::pending(Stage::Claim(c), route),
            Ok((c, true)) => Decision::pending(Stage::PlaceThenClaim(c), route),
            Err(r) => self.reject(r),
        }
    }

    /// What a first keyed request does next once its rate check passed: its key claimed in the
    /// store. A tenant at its limit of requests in flight is refused before its key is claimed:
    /// a storm of refused retries costs no store write. On a node, its place is taken for good
    /// after the claim; a fleet concurrency's place is taken before it (leased first when the
    /// node holds none free), so that a refusal never writes the key. The claim to make, and
    /// whether a place must be leased first.
    fn claim_stage(
        &self,
        charge: RateCharge,
        claim: Claim,
        key: Box<[u8]>,
        request: u128,
        meter: usize,
    ) -> Result<(Box<KeyClaim>, bool), Rejection> {
        let state = charge.state();
        let limit = state.plan.concurrency;
        if limit != 0 && !state.plan.shadow && state.plan.concurrency_fleet {
            let placed = match self.places.enter(state) {
                Ok(Some(slot)) => ClaimPlace::Taken(Some(slot)),
                Ok(None) => {
                    drop(claim);
                    return Err(Self::too_many_in_flight(charge, meter));
                }
                Err(()) => {
                    let c = KeyClaim { charge, claim, key, request, placed: ClaimPlace::After };
                    return Ok((Box::new(c), true));
                }
            };
            return Ok((Box::new(KeyClaim { charge, claim, key, request, placed }), false));
        }
        if limit != 0 && !state.plan.shadow && Slot::full(&self.in_flight, &state.id, limit) {
            drop(claim);
            return Err(Self::too_many_in_flight(charge, meter));
        }
        Ok((Box::new(KeyClaim { charge, claim, key, request, placed: ClaimPlace::After }), false))
    }

    /// A replay of a key this node saw complete: its rate check, then its stored response is
    /// read (never a quota: a replay takes no units).
    #[cold]
    #[inline(never)]
    fn replay_key(&self, mut charge: RateCharge, route: RouteCost, key: &[u8], request: u128) -> Decision {
        if let Err(r) = self.check_rate(&mut charge, &route) {
            return self.reject(r);
        }
        Decision::pending(Stage::Replay(Box::new(ReplayRead { charge, key: key.into(), request })), route)
    }

    /// Reads the stored response of a replay, within `usage.store_timeout`, under the
    /// configuration `rt` it was decided under. A key the store no longer holds (expired
    /// there, or its response was not stored) is claimed anew: the request runs and is
    /// charged. Refused, its rate cells go back (its charge's drop).
    pub(crate) async fn read_replay(&self, r: ReplayRead, route: RouteCost, rt: &Arc<Runtime>) -> Decision {
        let ReplayRead { charge, key, request } = r;
        let state = charge.state();
        let config = &rt.config;
        let timeout = config.usage.store_timeout;
        let fleet_key = Idempotency::fleet_key(&state.id, &key);
        // This node's own settlement of the key, if it is still under way.
        self.idempotency.settled(&fleet_key, timeout).await;
        let now = self.shared.clock().unix_secs();
        let store = &self.shared.stores().request().idempotency;
        let bound_to = format!("{request:032x}");
        let read = store.read_idempotency(&fleet_key, &bound_to, now).await;
        match read {
            Ok(Some(IdempotencyState::Completed(Some(response)))) => {
                self.replay(charge, route, response, config.limits.idempotency_max_request_body)
            }
            Ok(Some(IdempotencyState::Completed(None))) => self.reject(Self::response_not_kept(state)),
            Ok(Some(IdempotencyState::Mismatch)) => {
                // Bound elsewhere to another request (this node's entry was stale).
                self.idempotency.forget(&state.id, &key);
                self.reject(Self::key_mismatch(state))
            }
            Ok(Some(_)) => self.reject(Self::key_in_use(state)),
            Ok(None) => {
                // Not in the store any more: this node's entry is stale; the key is claimed
                // as a new one (the rate check already passed).
                self.idempotency.forget(&state.id, &key);
                match self.idempotency.check(&state.id, &key, request) {
                    // As a first request: its place first on a fleet concurrency.
                    Verdict::First(claim) => match self.claim_stage(charge, claim, key, request, route.meter) {
                        Ok((c, true)) => Box::pin(self.place_then_claim(*c, route, rt)).await,
                        Ok((c, false)) => Box::pin(self.claim_in_store(*c, route, rt)).await,
                        Err(r) => self.reject(r),
                    },
                    _ => self.reject(Self::key_in_use(state)),
                }
            }
            Err(_) => {
                // A replay cannot be answered without its response, nor run again (its work
                // was done): 503 whatever the policy.
                let r = Rejection::new(
                    RejectionKind::StoreUnavailable,
                    "the response of this Idempotency-Key could not be read from the store",
                );
                self.reject(r.with_retry_after(1).for_tenant(state))
            }
        }
    }

    /// A replay admitted with its stored response: nothing charged, no quota touched.
    fn replay(
        &self,
        charge: RateCharge,
        route: RouteCost,
        response: Box<StoredResponse>,
        max_request_body: u64,
    ) -> Decision {
        let at = charge.at;
        let (state, mut headers) = charge.keep();
        self.shared.metrics().replays.increment(1);
        self.count_admitted(&state);
        Self::quota_headers(&state, &mut headers, route.meter, at);
        Decision::Admitted(Pass {
            state,
            headers,
            source: None,
            at,
            claim: Some(Box::new(Held::Replay { response, max_request_body })),
            cost: route.cost,
            charged: false,
            done: false,
            called: false,
            in_poll: false,
            slot: None,
            hold: None,
            spend: None,
            org: None,
        })
    }

    /// A completed binding stored without its response (by a version before responses were
    /// stored): it can be neither replayed nor run again.
    #[cold]
    fn response_not_kept(state: &Tenant) -> Rejection {
        let r = Rejection::new(
            RejectionKind::IdempotencyKeyInUse,
            "the request with this Idempotency-Key completed, and its response was not kept: use a new key",
        );
        r.for_tenant(state)
    }

    fn key_in_use(state: &Tenant) -> Rejection {
        let r = Rejection::new(
            RejectionKind::IdempotencyKeyInUse,
            "a request with this Idempotency-Key is still being processed",
        );
        r.with_retry_after(1).for_tenant(state)
    }

    fn key_mismatch(state: &Tenant) -> Rejection {
        let r = Rejection::new(
            RejectionKind::IdempotencyKeyMismatch,
            "this Idempotency-Key was used for another request (method or path)",
        );
        r.for_tenant(state)
    }

    /// Asks the store about an `Idempotency-Key` this node has not seen (one conditional
    /// write), within `usage.store_timeout`, under the configuration `rt` the request was
    /// decided under; then decides as [`decide`](Self::decide) does. A store that does not
    /// answer follows `on_store_error`: fail-open charges the request under this node's claim
    /// alone, fail-closed answers 503. Refused, its rate cells go back (its charge's drop).
    pub(crate) async fn claim_in_store(&self, c: KeyClaim, route: RouteCost, rt: &Arc<Runtime>) -> Decision {
        let KeyClaim { charge, mut claim, key, request, placed } = c;
        let state = charge.state();
        let now = self.shared.clock().unix_secs();
        let config = &rt.config;
        let window = i64::try_from(config.limits.idempotency_window.as_secs()).unwrap_or(i64::MAX);
        let owner = self.shared.ids().node() ^ self.shared.ids().next_seq().wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let fleet_key = Idempotency::fleet_key(&state.id, &key);
        let ask = IdempotencyClaim::new(
            fleet_key.clone(),
            format!("{request:032x}"),
            owner,
            now,
            now.saturating_add(IN_FLIGHT_SECS.min(window)),
            now.saturating_add(window),
        )
        .at_most(config.limits.idempotency_keys_max);
        let timeout = config.usage.store_timeout;
        let settling = self.idempotency.settling();
        // A claim of this key this node is still settling (a failed request retried at once).
        settled(settling, &fleet_key, timeout).await;
        // Held before the call: if the call times out after landing, or this future is dropped,
        // the claim still settles (released, or completed under fail-open); a settle of a
        // binding this owner does not hold changes nothing.
        claim.fleet = Some(Box::new(FleetClaim {
            store: self.shared.stores().background().idempotency.clone(),
            key: fleet_key,
            owner,
            settling: settling.clone(),
            claimed_at: now,
            window,
            max_stored: config.limits.idempotency_store_bytes,
            responses: self.idempotency.responses().clone(),
            limits: CaptureLimits {
                max_body: config.limits.idempotency_max_body,
                max_request_body: config.limits.idempotency_max_request_body,
                buffer_bytes: config.limits.idempotency_buffer_bytes,
            },
            renewal: None,
        }));
        let answer = self.shared.stores().request().idempotency.claim_idempotency(&ask).await;
        if let Ok(IdempotencyState::Full) = answer {
            // The store holds the fleet's cap of live keys: served without its key, counted.
            // Dropped here: this node's hold on the key goes too, and nothing is stored.
            claim.fleet = None;
            drop(claim);
            self.idempotency.responses().not_stored(NotStored::KeysFull);
            return self.decide_claimed(charge, route, None, placed);
        }
        if !matches!(answer, Ok(IdempotencyState::Claimed) | Err(_)) {
            // Bound by another request: nothing of this node's to settle.
            claim.fleet = None;
        }
        // Also when the call failed: it may have landed (a timeout), and a claim it did not
        // make is answered NotHeld, which ends the renewals.
        if let (Ok(IdempotencyState::Claimed) | Err(_), Some(fleet)) = (&answer, claim.fleet.as_mut()) {
            // Held while the request runs, however long (up to `idempotency_max_in_flight`).
            fleet.renew_while_running(self.shared.clock().clone(), config.limits.idempotency_max_in_flight);
        }
        // Refused for its key (or the store): the request spends no rate cells (its charge
        // goes back as it drops).
        match answer {
            Ok(IdempotencyState::Claimed) => self.decide_claimed(charge, route, Some(claim), placed),
            Ok(IdempotencyState::Completed(Some(response))) => {
                // Completed on another node: a replay here too from now on.
                claim.completed_elsewhere();
                let max_request_body = config.limits.idempotency_max_request_body;
                self.replay(charge, route, response, max_request_body)
            }
            Ok(IdempotencyState::Completed(None)) => self.reject(Self::response_not_kept(state)),
            Ok(IdempotencyState::InFlight) => self.reject(Self::key_in_use(state)),
            Ok(IdempotencyState::Mismatch) => self.reject(Self::key_mismatch(state)),
            Ok(IdempotencyState::Full) => unreachable!("answered above"),
            Err(_) => {
                if state.usage_policy() == StoreErrorPolicy::FailClosed {
                    let r = Rejection::new(RejectionKind::StoreUnavailable, "the quota store did not answer in time");
                    self.reject(r.with_retry_after(1).for_tenant(state))
                } else {
                    self.decide_claimed(charge, route, Some(claim), placed)
                }
            }
        }
    }

    /// A first request decided on once its key is claimed: with the place it took before the
    /// claim (`placed`), or taking its place now.
    fn decide_claimed(
        &self,
        charge: RateCharge,
        route: RouteCost,
        claim: Option<Claim>,
        placed: ClaimPlace,
    ) -> Decision {
        match placed {
            ClaimPlace::Taken(slot) => self.decide_placed(charge, route, true, claim, slot),
            ClaimPlace::After => self.decide_rated(charge, route, true, claim),
        }
    }
}
