//! The ledger's invariants, checked once the run's operations ended: every webhook delivered,
//! the killed nodes' reservations expired, every live node stopped.
//!
//! - **never over**: what `q` was served is within its hard limits; what `b` was served within
//!   what its payments bought; what `s` spent within the highest spend cap it had (and once the nodes stopped, before the expiries,
//!   `driver::checkpoint`: what `q` was served is reserved in its counters);
//! - **nothing stranded**: past every expiry, each counter holds what the usage store holds
//!   (reserved = used), and a node alone is served exactly what the store has left: `q`'s
//!   limits less what they count, `b`'s balance;
//! - **conserved**: what the usage store holds is what the nodes were served, to the unit
//!   (less what a killed node had not flushed, at most what it was served); `b`'s balance
//!   grants what its payments bought less what refunds took back;
//! - **money**: one grant per payment, of the units it bought; none without a payment; refunds
//!   take back at most what their money bought;
//! - **billed once**: Stripe's totals are what the usage store holds;
//! - **alerts once**: each crossing alerted under one id, signed and of the schema, and `q`'s
//!   limits, once reached, alerted at each threshold.

use std::time::Duration;

use tollgate::{
    door::{Admission, Credential, RequestInfo},
    money::SPEND_METER,
    store::{CreditGrant, QuotaInspect},
    Overrun,
};

use crate::{
    common::{committed, req, Harness, NOON},
    driver::{payment_of, refund_share, Outcome},
    fleet::{
        Fleet, CENT_NANOS, PACK_CENTS, PACK_UNITS, PAYMENT_AMOUNT, RECHARGE_MONTHLY_CENTS, REQUESTS_LIMIT,
        REQUEST_NANOS, TOKENS_LIMIT, TOKEN_NANOS,
    },
    ops::Who,
};

/// The range of windows a run's usage falls in.
const FROM: i64 = NOON - 86_400;

pub(crate) async fn check(fleet: &mut Fleet, outcome: &mut Outcome) {
    let v = &mut outcome.violations;
    // Every bank debit settles, every invoice waiting for its customer is paid or left, and
    // every webhook is delivered: Stripe sends each until it is answered 200.
    // The recharges each live node claimed are delivered (charged), what they emitted queued.
    for (node, _) in fleet.live() {
        node.tollgate.deliver_recharges().await;
    }
    for (pick, _) in fleet.stripe.processing_debits().iter().enumerate() {
        fleet.settle(u16::try_from(pick).unwrap_or(0), true);
    }
    fleet.take_emitted();
    fleet.redeliver = false;
    let mut round = 0u8;
    while !fleet.queue.is_empty() {
        round = round.wrapping_add(1);
        if round > 200 {
            v.push(format!("webhooks: {} deliveries never answered 200 without faults", fleet.queue.len()));
            break;
        }
        if let Err(e) = fleet.deliver(0, round % 3).await {
            v.push(format!("webhooks: {e}"));
        }
    }
    // Every live node stopped (what they kept goes back), then past the reservations' expiry:
    // `limits.reservation_expiry`, or for the holds of a lease given back before its node was
    // killed, `limits.hold_timeout` (an hour here), each with the clock skew's bound.
    for problem in fleet.shut_down().await {
        v.push(format!("conserved: {problem}"));
    }
    crate::driver::checkpoint(fleet, "once the nodes stopped", v).await;
    fleet.advance(2 * 3_600);
    // A node's calls after the expiry give back what the killed nodes kept; it stops too.
    let prime = fleet.node();
    for who in [Who::Q, Who::B, Who::S, Who::D] {
        match hold(&prime.h, who, 1).await {
            Ok((ticket, hold)) => {
                let units = close(ticket, hold, 1);
                tally_node(fleet, who, 1, units);
            }
            Err((charged, _)) => tally_node(fleet, who, u64::from(charged), 0),
        }
        // A plain request too: a hold refused for its tokens may never reach the cell of the
        // requests (a lease expired is given back by the cell's next call).
        if prime.h.send(req("GET", "/items", Some(who.key()), None)).await.status.as_u16() == 200 {
            tally_node(fleet, who, 1, 0);
        }
    }
    stop(&prime.h, v).await;

    // What the store holds now.
    let quota = fleet.stores.quota.clone();
    let counter = |meter: &'static str| {
        let quota = quota.clone();
        async move {
            let counters = quota.counters(&"q".into(), &meter.into()).await.expect("counters read");
            counters.iter().map(|c| c.reserved).sum::<u64>()
        }
    };
    let (q_requests, q_tokens) = (counter("requests").await, counter("tokens").await);
    let verbose = std::env::var_os("AUDIT_VERBOSE").is_some();
    if verbose {
        eprintln!("after the expiry and the stops: q's counters: requests {q_requests}, tokens {q_tokens}");
    }

    // Money: one grant per payment, of what it bought; refunds at most what they bought back.
    let (grants, balances) = quota.credit_grants(&"b".into(), Some(&"tokens".into())).await.expect("grants read");
    money(fleet, &grants, v);
    let bought: u64 = grants.iter().map(|g| g.bought).sum();
    if verbose {
        for g in &grants {
            eprintln!("grant {} units {} bought {} taken {} takes {:?}", g.id, g.units, g.bought, g.taken, g.takes);
        }
    }
    let taken: u64 = grants.iter().map(taken_back).sum();
    let balance = balances.into_iter().map(|(_, b)| b).next().unwrap_or_default();
    let (b_served, b_dead) = fleet.tally.served(Who::B, "tokens");
    if b_served > bought + b_dead {
        v.push(format!(
            "never over: b was served {b_served} tokens; its payments bought {bought} ({b_dead} on nodes killed)"
        ));
    }

    // Nothing stranded: a node alone is served exactly what is left.
    let alone = fleet.node();
    let q_left = TOKENS_LIMIT.saturating_sub(q_tokens);
    // (Each hold is a request: with fewer than two requests left, q's tokens cannot be asked.)
    let charged = if q_requests + 2 <= REQUESTS_LIMIT {
        stranded(fleet, &alone.h, Who::Q, q_left, "q's tokens", v).await
    } else {
        0
    };
    let b_left = u64::try_from(balance.left()).unwrap_or(0);
    stranded(fleet, &alone.h, Who::B, b_left, "b's balance", v).await;
    // q's requests: less those its holds above were charged.
    let requests_left = REQUESTS_LIMIT.saturating_sub(q_requests + charged);
    let mut served = 0;
    for _ in 0..=requests_left {
        if alone.h.send(req("GET", "/items", Some(Who::Q.key()), None)).await.status.as_u16() == 200 {
            served += 1;
        }
    }
    tally_node(fleet, Who::Q, served, 0);
    // s: what its cap in force leaves, a request and a hold of the tokens it pays for.
    let s_spent = counter_of(&quota, Who::S, SPEND_METER).await;
    match tollgate::admin::Admin::for_engine(&alone.h.tollgate).spend_cap(Who::S.id()).await {
        Ok(cap) => {
            let left = cap.limit.saturating_sub(s_spent);
            let tokens = left.saturating_sub(REQUEST_NANOS) / TOKEN_NANOS;
            if verbose {
                eprintln!("alone: s's cap {} nanos, its counter {s_spent}: {tokens} tokens left", cap.limit);
            }
            if tokens == 0 && left >= REQUEST_NANOS {
                // Room for a request, not for a token besides: a plain request is served.
                let status = alone.h.send(req("GET", "/items", Some(Who::S.key()), None)).await.status.as_u16();
                if status == 200 {
                    tally_node(fleet, Who::S, 1, 0);
                } else {
                    v.push(format!(
                        "nothing stranded: s's spend cap: {left} nano-dollars left, a request refused {status}"
                    ));
                }
            }
            stranded(fleet, &alone.h, Who::S, tokens, "s's spend cap", v).await;
        }
        Err(e) => v.push(format!("nothing stranded: s's spend cap could not be read: {e}")),
    }
    if verbose {
        eprintln!("alone: q's holds charged {charged} requests, then {served} of {requests_left} left served");
    }
    if served != requests_left {
        v.push(format!(
            "nothing stranded: q's requests: a node alone was served {served}; the store had {requests_left} left"
        ));
    }
    // d: what the limits of the plan and overrides it ended on leave.
    if let Some(limits) = crate::plans::d_limits(fleet, v).await {
        let used = (counter_of(&quota, Who::D, "requests").await, counter_of(&quota, Who::D, "tokens").await);
        if verbose {
            eprintln!("alone: d's limits {limits:?}, its counters {used:?}");
        }
        crate::plans::d_alone(fleet, &alone.h, limits, used, v).await;
    }
    stop(&alone.h, v).await;

    // Whether q's quotas were filled to their limits (by the lone node): every crossing of
    // them happened, and each must have been alerted.
    let q_limits_reached = counter("requests").await == REQUESTS_LIMIT && counter("tokens").await == TOKENS_LIMIT;

    // Never over: what s spent in all is within the highest cap it had in force (a cap
    // lowered lets through the spend leases nodes held already, within the cap they were
    // taken under).
    let (spent, spent_dead) = fleet.tally.spent();
    let highest = fleet.highest_cap * CENT_NANOS;
    if spent > highest + spent_dead {
        v.push(format!(
            "never over: s spent {spent} nano-dollars; its highest cap was {highest} ({spent_dead} on nodes killed)"
        ));
    }

    // Never over: what q was served in all (the auditor's nodes too) is within its limits,
    // but for what a node killed used since its last report (given back at its expiry, and
    // lost with it: docs/architecture.md, "Stranded units"), at most what it was served.
    for (meter, limit) in [("requests", REQUESTS_LIMIT), ("tokens", TOKENS_LIMIT)] {
        let (served, dead) = fleet.tally.served(Who::Q, meter);
        if served > limit + dead {
            v.push(format!("never over: q was served {served} {meter} of {limit} ({dead} on nodes killed)"));
        }
    }
    // And d's within the highest limits it may have had: a move between plans, or an
    // override, keeps the period's counters.
    let (highest_requests, highest_tokens) = fleet.d_highest();
    for (meter, limit) in [("requests", highest_requests), ("tokens", highest_tokens)] {
        let (served, dead) = fleet.tally.served(Who::D, meter);
        if served > limit + dead {
            v.push(format!(
                "never over: d was served {served} {meter}; the highest limit it had was {limit} ({dead} on nodes \
                 killed)"
            ));
        }
    }

    // Conserved: the counters and the usage store hold what was served.
    let killed = fleet.tally.any_killed();
    let usage = fleet.stores.usage.clone();
    let to = fleet.now() + 86_400;
    for (who, meter) in
        [(Who::Q, "requests"), (Who::Q, "tokens"), (Who::D, "requests"), (Who::D, "tokens"), (Who::B, "tokens")]
    {
        let stored = committed(&*usage, who.id(), meter, FROM, to, 3_600).await;
        let (served, dead) = fleet.tally.served(who, meter);
        if stored > served || served - stored > dead {
            v.push(format!(
                "conserved: {}'s {meter}: the usage store holds {stored}; the nodes were served {served} \
                 ({dead} on nodes killed)",
                who.id()
            ));
        }
        let reserved = match (who, meter) {
            (Who::Q, "requests") => counter("requests").await,
            (Who::Q, _) => counter("tokens").await,
            (Who::D, meter) => counter_of(&quota, Who::D, meter).await,
            _ => {
                let (_, balances) = quota.credit_grants(&"b".into(), Some(&"tokens".into())).await.unwrap();
                balances.into_iter().map(|(_, b)| b.reserved).next().unwrap_or(0)
            }
        };
        if verbose {
            eprintln!("{}'s {meter}: served {served} ({dead} killed), stored {stored}, counter {reserved}", who.id());
        }
        // A refund may take back units already used (the balance held fewer): the counter
        // then holds less than was used, by at most what refunds took.
        let slack = if who == Who::B { taken } else { 0 } + if killed { dead } else { 0 };
        // A killed node's refill applied whose answer was lost (its request or job answered
        // 503) counted that request's or job's units used, and the node never sent it again:
        // they stay so (docs/architecture.md, "Stranded units"). Not a hold's: its units are kept.
        let unanswered = fleet.tally.unanswered_dead(who, meter);
        // A job's event delivered again through another node, whose write failed or went
        // unanswered and whose retry answered `Duplicate`: its units stay spent there
        // (docs/events.md, "A store failure").
        let kept = if meter == "tokens" { fleet.tally.served(who, crate::driver::KEPT_BY_REDELIVERY).0 } else { 0 };
        let dead = dead + unanswered + kept;
        if reserved > stored + dead || stored > reserved + slack {
            v.push(format!(
                "nothing stranded: {}'s {meter} counter holds {reserved} past every expiry; the usage store \
                 {stored} (slack {slack}; killed nodes lost {dead}, {unanswered} of them refused or given back, \
                 {kept} kept by redeliveries)",
                who.id()
            ));
        }
    }
    // s: its usage store holds what it was served, and its spend what that cost; past every
    // expiry its spend counter holds what its spend usage does.
    for meter in ["requests", "tokens"] {
        let stored = committed(&*usage, Who::S.id(), meter, FROM, to, 3_600).await;
        let (served, dead) = fleet.tally.served(Who::S, meter);
        if stored > served || served - stored > dead {
            v.push(format!(
                "conserved: s's {meter}: the usage store holds {stored}; the nodes were served {served} \
                 ({dead} on nodes killed)"
            ));
        }
    }
    let stored = committed(&*usage, Who::S.id(), SPEND_METER, FROM, to, 3_600).await;
    let reserved = counter_of(&quota, Who::S, SPEND_METER).await;
    if verbose {
        eprintln!("s's spend: spent {spent} ({spent_dead} killed), stored {stored}, counter {reserved}");
    }
    if stored > spent || spent - stored > spent_dead {
        v.push(format!(
            "conserved: s's spend: the usage store holds {stored}; what s was served cost {spent} \
             ({spent_dead} on nodes killed)"
        ));
    }
    // As q's requests: a killed node's refill applied and unanswered leaves its request's cost.
    let dead = spent_dead + fleet.tally.unanswered_dead(Who::S, "requests") * REQUEST_NANOS;
    // As q's: a killed node's spend since its last call that landed is given back at its
    // expiry though it was used (and committed by a flush), so the counter may hold that less.
    let slack = if killed { spent_dead } else { 0 };
    if reserved > stored + dead || stored > reserved + slack {
        v.push(format!(
            "nothing stranded: s's spend counter holds {reserved} past every expiry; the usage store {stored} \
             (killed nodes lost {dead})"
        ));
    }

    // A grant loses units only to its refunds and disputes (each take at most what it held
    // then, so what they recorded bounds it), and never holds more than it bought.
    if balance.granted > bought || balance.granted + taken < bought {
        v.push(format!("conserved: b's balance grants {}; bought {bought}, taken back {taken}", balance.granted));
    }

    // Billed once: every closed window exported, Stripe's totals are the usage store's.
    fleet.advance(2 * 3_600);
    let exporter = fleet.node();
    let mut quiet = 0;
    for _ in 0..30 {
        match exporter.h.tollgate.export().await {
            Ok(report) if report.events == 0 && report.retries == 0 && report.waiting == 0 => {
                quiet += 1;
                if quiet == 2 {
                    break;
                }
            }
            _ => quiet = 0,
        }
        fleet.advance(60);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let totals = fleet.stripe.totals();
    for (who, meter) in
        [(Who::Q, "requests"), (Who::Q, "tokens"), (Who::D, "requests"), (Who::D, "tokens"), (Who::B, "tokens")]
            .into_iter()
            .chain([(Who::S, "requests"), (Who::S, "tokens")])
    {
        let stored = committed(&*usage, who.id(), meter, FROM, fleet.now() + 86_400, 3_600).await;
        let billed = totals.get(&(who.customer().to_owned(), meter.to_owned())).copied().unwrap_or(0);
        let (served, dead) = fleet.tally.served(who, meter);
        let billed_units = u64::try_from(billed).unwrap_or(0);
        if i64::try_from(stored).unwrap() != billed || billed_units > served || served - billed_units > dead {
            v.push(format!(
                "billed once: {}'s {meter}: Stripe holds {billed}; the usage store {stored}; the nodes were \
                 served {served} ({dead} on nodes killed)",
                who.id()
            ));
        }
    }
    stop(&exporter.h, v).await;

    alerts_once(fleet, q_limits_reached, v).await;
}

/// Alerts once: every alert the receiver got is signed and of the schema, and each crossing
/// (a tenant's meter, its period, its limit, the threshold) came under one id, however many
/// nodes saw it, were killed, or met the store's faults. `q`'s quotas, filled to their limits
/// by the lone node, were alerted at 50%, 90% and the limit, each.
async fn alerts_once(fleet: &mut Fleet, q_limits_reached: bool, v: &mut Vec<String>) {
    if fleet.alerts.is_none() {
        return;
    }
    // Past every claim a killed node held: one node delivers what is due.
    fleet.advance(3_600);
    let sender = fleet.node();
    if q_limits_reached {
        // The lone node's last hold reached q's token limit, and a crossing is seen in a
        // store's answer to a call that follows it (docs/alerts.md, "The one gap": the
        // tenant's next request): q asks once more for each meter, and is refused.
        let asked = sender.h.send(req("GET", "/items", Some(Who::Q.key()), None)).await.status.as_u16();
        let at = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(fleet.now()).unwrap());
        let event = tollgate::events::Event::new("alert-probe", "q".into(), "tokens".into(), 1, at);
        let reserved = sender.h.tollgate.reserve_event(&event, Duration::from_secs(60)).await;
        if asked != 429 || reserved.is_ok() {
            v.push(format!("never over: q past its limits was answered {asked} and {reserved:?}"));
        }
        if let Err(e) = sender.h.tollgate.flush().await {
            v.push(format!("alerts once: the flush that writes the alerts failed: {e}"));
        }
    }
    for _ in 0..50 {
        let report = sender.h.tollgate.deliver_alerts().await;
        if report.claimed == 0 {
            break;
        }
        fleet.advance(60);
    }
    stop(&sender.h, v).await;
    let Some((receiver, _)) = &fleet.alerts else { return };
    let got = receiver.received().await;
    if std::env::var_os("AUDIT_VERBOSE").is_some() {
        for d in &got {
            eprintln!("alert {:?} {:?} {}", d.id, d.kind, d.data);
        }
    }
    let mut crossings: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = Default::default();
    for d in &got {
        if !d.verified || !d.valid {
            v.push(format!("alerts once: a delivery failed its signature or schema: {d:?}"));
        }
        let kind = d.kind.clone().unwrap_or_default();
        let data = &d.data;
        // A balance's crossings are also named by its newest grant, which the body does not
        // carry: the same threshold of the same limit may be a new alert after a purchase.
        if kind.starts_with("balance.") {
            continue;
        }
        let crossing = format!(
            "{kind} {} {} limit {} threshold {} period {}",
            data["tenant"], data["meter"], data["limit"], data["threshold"], data["period"]["start"]
        );
        crossings.entry(crossing).or_default().insert(d.id.clone().unwrap_or_default());
    }
    for (crossing, ids) in &crossings {
        if ids.len() > 1 {
            v.push(format!("alerts once: {crossing} was alerted under {} ids: {ids:?}", ids.len()));
        }
    }
    if q_limits_reached {
        for (meter, limit) in [("requests", REQUESTS_LIMIT), ("tokens", TOKENS_LIMIT)] {
            for (kind, percent) in
                [("quota.threshold_crossed", 50), ("quota.threshold_crossed", 90), ("quota.exhausted", 100)]
            {
                let threshold = serde_json::json!({ "percent": percent });
                let alerted = got.iter().any(|d| {
                    d.kind.as_deref() == Some(kind)
                        && d.data["tenant"] == "q"
                        && d.data["meter"] == meter
                        && d.data["limit"] == limit
                        && d.data["threshold"] == threshold
                });
                if !alerted {
                    v.push(format!("alerts once: q's {meter} reached its limit and {kind} {threshold} was never sent"));
                }
            }
        }
    }
}

/// What `who`'s counters of `meter` reserve, in all.
async fn counter_of(quota: &std::sync::Arc<dyn QuotaInspect>, who: Who, meter: &str) -> u64 {
    let counters = quota.counters(&who.id().into(), &meter.into()).await.expect("counters read");
    counters.iter().map(|c| c.reserved).sum()
}

/// Every grant of `b` is one payment's, of the units it bought, made once: a checkout of the
/// run's, or a recharge's invoice that Stripe holds paid; refunds took back at most what their
/// money bought. Every invoice paid is granted, once; a month's recharges charge at most the
/// plan's monthly limit, and each recharge is charged once.
fn money(fleet: &Fleet, grants: &[CreditGrant], v: &mut Vec<String>) {
    let invoices = fleet.stripe.invoices_created();
    let mut charged_recharges = std::collections::BTreeSet::new();
    let mut charged = 0u64;
    for invoice in &invoices {
        let id = invoice["id"].as_str().unwrap_or_default();
        let paid = invoice["status"] == "paid";
        // What its packs cost, however it was paid (the customer's credit balance, which credit
        // notes fill, pays some or all of it; a debit adds to it).
        let amount = invoice["total"].as_u64().unwrap_or(0);
        if std::env::var_os("AUDIT_VERBOSE").is_some() {
            eprintln!(
                "recharge invoice {id}: {} total {amount} paid {} starting balance {}",
                invoice["status"], invoice["amount_paid"], invoice["starting_balance"]
            );
        }
        let grant: Vec<&CreditGrant> = grants.iter().filter(|g| g.id == id).collect();
        if paid {
            charged += amount;
            let recharge = invoice["metadata"]["tollgate_recharge_id"].as_str().unwrap_or(id).to_owned();
            if !charged_recharges.insert(recharge.clone()) {
                v.push(format!("money: recharge {recharge} was charged twice (invoice {id})"));
            }
            let units = amount / PACK_CENTS * PACK_UNITS;
            match grant.as_slice() {
                [g] if g.bought == units => {}
                [g] => {
                    v.push(format!("money: invoice {id} paid {amount} cents for {units} units; granted {}", g.bought))
                }
                [] => v.push(format!("money: invoice {id} was paid ({amount} cents) and never credited")),
                _ => v.push(format!("money: invoice {id} granted {} times", grant.len())),
            }
        } else if !grant.is_empty() {
            v.push(format!("money: invoice {id} is {} and was granted", invoice["status"]));
        }
    }
    if charged > RECHARGE_MONTHLY_CENTS {
        let paid: Vec<String> = invoices
            .iter()
            .filter(|i| i["status"] == "paid")
            .map(|i| format!("{} {} cents {}", i["id"], i["amount_paid"], i["metadata"]))
            .collect();
        v.push(format!(
            "money: recharges charged {charged} cents in a month; its limit is {RECHARGE_MONTHLY_CENTS}: {paid:?}"
        ));
    }
    let invoiced = |g: &CreditGrant| invoices.iter().any(|i| i["id"].as_str() == Some(g.id.as_str()));
    let mut seen = std::collections::BTreeSet::new();
    for g in grants.iter().filter(|g| !invoiced(g)) {
        let Some(n) = payment_of(g.payment.as_deref()) else {
            v.push(format!("money: grant `{}` of {} units has no payment of the run", g.id, g.bought));
            continue;
        };
        let Some(paid) = fleet.payments.get(&n) else {
            v.push(format!("money: grant `{}` names payment {n}, never paid", g.id));
            continue;
        };
        if !seen.insert(n) {
            v.push(format!("money: payment {n} granted twice"));
        }
        if g.bought != paid.units {
            v.push(format!("money: payment {n} bought {} units; its grant holds {}", paid.units, g.bought));
        }
        let most = refund_share(paid.units, paid.refunded);
        if g.taken > most {
            v.push(format!(
                "money: payment {n}'s refunds ({} cents) took back {} units; they bought {most}",
                paid.refunded, g.taken
            ));
        }
        // Its dispute: lost, it takes back what the balance held of it; won, nothing stays taken.
        let dispute = format!("dp_audit_{n}");
        let takes: Vec<_> = g.takes.iter().filter(|t| t.id == dispute).collect();
        match paid.dispute {
            Some(true) if takes.iter().any(|t| !t.given_back && t.removed > 0) => {
                v.push(format!("money: payment {n}'s dispute was won and its units stay taken: {takes:?}"));
            }
            Some(false) if takes.iter().all(|t| t.given_back) && g.units > 0 => {
                v.push(format!("money: payment {n}'s dispute was lost and took nothing back: {takes:?} ({g:?})"));
            }
            None if !takes.is_empty() => v.push(format!("money: payment {n} was never disputed: {takes:?}")),
            _ => {}
        }
        notes(n, paid, g, v);
        // What it lost is what its refunds, disputes and notes took, at most (a refund after a
        // dispute that took everything counts what it meant, and removes nothing).
        if g.units > g.bought || g.bought - g.units > taken_back(g) {
            v.push(format!(
                "money: payment {n}'s grant holds {} of the {} it bought; its refunds, disputes and notes took {}: \
                 {g:?}",
                g.units,
                g.bought,
                taken_back(g)
            ));
        }
    }
    for n in fleet.payments.keys() {
        if !seen.contains(n) {
            v.push(format!("money: payment {n} was paid and never credited"));
        }
    }
}

/// What `g`'s refunds, disputes and credit notes took back, at most: refunds what they meant
/// (`taken`, whether the grant still held it or not); a take reversed what it removed of the
/// units counted used (the rest came back); a take in force what it removed, or, where
/// another take was reversed, all it meant, whether the grant held it then or not: the
/// reversal gave back that much less (the store's rule, `refund_against`: a note credited
/// while a dispute held the grant's units keeps them when the dispute is won).
fn taken_back(g: &CreditGrant) -> u64 {
    let reversed = g.takes.iter().any(|t| t.given_back);
    let takes: u64 = g
        .takes
        .iter()
        .map(|t| match (t.given_back, reversed) {
            (true, _) => t.removed.saturating_sub(t.unspent),
            (false, true) => t.units,
            (false, false) => t.removed,
        })
        .sum();
    g.taken + takes
}

/// Payment `n`'s credit notes: each in force took what its money bought, once; each voided
/// has its take given back; nothing else took as a note.
fn notes(n: u16, paid: &crate::fleet::Payment, g: &CreditGrant, v: &mut Vec<String>) {
    if std::env::var_os("AUDIT_VERBOSE").is_some() && !paid.notes.is_empty() {
        eprintln!("notes of {n}: {:?}; takes {:?}; grant bought {} taken {}", paid.notes, g.takes, g.bought, g.taken);
    }
    for t in g.takes.iter().filter(|t| t.id.starts_with("cn_")) {
        match paid.notes.iter().find(|note| note.id == t.id) {
            None => v.push(format!("money: payment {n}'s grant holds a take of a note never issued: {t:?}")),
            Some(note) if t.units > refund_share(paid.units, note.cents) => v.push(format!(
                "money: note {} of {} cents took {} units; its money bought {}",
                note.id,
                note.cents,
                t.units,
                refund_share(paid.units, note.cents)
            )),
            Some(_) => {}
        }
    }
    for note in paid.notes.iter().filter(|note| note.voided) {
        if !g.takes.iter().any(|t| t.id == note.id && t.given_back) {
            v.push(format!("money: note {} of payment {n} was voided and its take stays: {:?}", note.id, g.takes));
        }
    }
    for note in paid.notes.iter().filter(|note| !note.voided) {
        let share = paid.units * note.cents / PAYMENT_AMOUNT;
        if share > 0 && !g.takes.iter().any(|t| t.id == note.id && t.units == share && !t.given_back) {
            v.push(format!(
                "money: note {} of payment {n} ({} cents) did not take the {share} units it credits: {:?}",
                note.id, note.cents, g.takes
            ));
        }
    }
}

/// A hold of `units` tokens by `who` on `h`: admitted, or the refusal and whether its request
/// was charged (refused after its admission, it is).
async fn hold(
    h: &Harness,
    who: Who,
    units: u64,
) -> Result<(tollgate::door::Ticket, tollgate::Hold), (bool, tollgate::Rejection)> {
    let info = RequestInfo::new("POST", "/generate", Credential::ApiKey(who.key().as_bytes()));
    let ticket = match h.tollgate.admit(&info) {
        Admission::Admitted(t) => t,
        Admission::Pending(p) => h.tollgate.resolve(p).await.map_err(|r| (false, r))?,
        Admission::Rejected(r) => return Err((false, r)),
    };
    match ticket.context().hold_with("tokens", units, Overrun::Refuse).await {
        Ok(hold) => Ok((ticket, hold)),
        Err(r) => {
            drop(ticket);
            Err((true, r))
        }
    }
}

/// Records the `units` the hold was asked for (what it holds: on a plan whose only limit is a
/// spend cap, it holds their cost, and `held()` counts no units), and completes.
fn close(ticket: tollgate::door::Ticket, mut hold: tollgate::Hold, units: u64) -> u64 {
    hold.record(units).expect("what is held records");
    hold.settle();
    ticket.complete(200);
    units
}

/// The auditor's own requests, as served units (counted apart from the nodes killed).
fn tally_node(fleet: &Fleet, who: Who, requests: u64, tokens: u64) {
    fleet.tally.add(usize::MAX, who, "requests", requests);
    fleet.tally.add(usize::MAX, who, "tokens", tokens);
}

/// A node alone is served a hold of exactly `left` (when some is left), and then refused one
/// more unit. Returns the requests it was charged.
pub(crate) async fn stranded(fleet: &Fleet, h: &Harness, who: Who, left: u64, what: &str, v: &mut Vec<String>) -> u64 {
    let mut requests = 0;
    if left > 0 {
        match hold(h, who, left).await {
            Ok((ticket, hold)) => {
                let units = close(ticket, hold, left);
                tally_node(fleet, who, 1, units);
                requests += 1;
            }
            Err((charged, r)) => {
                tally_node(fleet, who, u64::from(charged), 0);
                requests += u64::from(charged);
                v.push(format!("nothing stranded: {what}: {left} left, a hold of them refused: {r}"));
            }
        }
    }
    match hold(h, who, 1).await {
        Ok((ticket, hold)) => {
            let units = close(ticket, hold, 1);
            tally_node(fleet, who, 1, units);
            requests += 1;
            v.push(format!("never over: {what}: past the {left} left, one more unit was served"));
        }
        Err((charged, _)) => {
            tally_node(fleet, who, u64::from(charged), 0);
            requests += u64::from(charged);
        }
    }
    requests
}

async fn stop(h: &Harness, v: &mut Vec<String>) {
    if let Err(e) = h.tollgate.shutdown().await {
        v.push(format!("conserved: a node's shutdown lost usage: {e}"));
    }
}
