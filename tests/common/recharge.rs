//! Auto-recharge across a fleet: four engines on one store spend a balance across the
//! tenant's `below` together; the check the stores' tests share (SQLite, PostgreSQL,
//! DynamoDB).
use std::{sync::Arc, time::Duration};

use super::{
    stripe::{Card, StandIn, SECRET as API_KEY},
    Harness, NOON,
};
use tollgate::{
    admin::Admin,
    billing::{RechargeCharger, Secret, WebhookOutcome},
    config::Config,
    money::RechargeAsk,
    store::{KeyHash, Store, TenantRecord},
    Tollgate,
};

const SECRET: &str = "whsec_recharge_fleet";

/// A plan whose balance on `requests` recharges in packs of 100 units (5.00 each) below 300,
/// to 1,000, at most 50.00 a month; a plan `pro` whose recharges buy `price_big`, packs of
/// 10,000 units (400.00 each on the stand-in, when a test adds it).
pub const CONFIG: &str = r#"
[usage]
store_timeout = "10s"
[limits]
directory_ttl = "30s"
[billing]
currency = "usd"
[plans.payg]
quotas.requests = { period = "prepaid" }
[plans.payg.recharge.requests]
price = "price_pack"
below = 300
to = 1000
monthly_limit = "50.00"
tenant_may_set = true
[plans.lite]
quotas.requests = { period = "prepaid" }
[plans.lite.recharge.requests]
price = "price_pack"
below = 100
to = 500
monthly_limit = "10.00"
[plans.pro]
quotas.requests = { period = "prepaid" }
[plans.pro.recharge.requests]
price = "price_big"
below = 300
to = 100000
monthly_limit = "5000.00"
[stripe]
[stripe.credits]
meter = "requests"
prices = { price_pack = 100, price_big = 10000 }
"#;

/// Four engines (nodes) on `store`, each charging through the stand-in, on one fake clock.
pub async fn fleet(store: Arc<dyn Store>, stripe: &StandIn) -> Vec<Harness> {
    let acme = TenantRecord::new("acme".into(), "payg".into()).with_customer("cus_acme");
    store.put_tenant(&acme, &[KeyHash::of(b"key-acme")]).await.unwrap();
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    (0..4)
        .map(|_| {
            let charger =
                RechargeCharger::new(&Secret::new(API_KEY), Some(&stripe.url), Duration::from_secs(5)).unwrap();
            let config = Config::from_toml_str(CONFIG).unwrap();
            let (engine, _worker) = Tollgate::builder(config)
                .store_arc(store.clone())
                .clock(clock.clone())
                .recharge_charger(charger)
                .build();
            Harness::from_layer(tollgate::TollgateLayer::new(engine), handle.clone())
        })
        .collect()
}

/// Four engines spend a balance of 500 across `below` (300) together, 100 requests each at
/// once: exactly one recharge is claimed, one invoice created and paid once, granted once by
/// its `invoice.paid`; the balance ends at the packs' units above what the claim saw, less
/// what was used since.
pub async fn four_engines_crossing_together_charge_once(store: Arc<dyn Store>) {
    let stripe = StandIn::start(&[]).await;
    stripe.add_price("price_pack", None, true);
    stripe.set_unit_amount("price_pack", 500);
    stripe.set_card("cus_acme", Card::Pays);
    let nodes = fleet(store.clone(), &stripe).await;
    let admin = Admin::for_engine(&nodes[0].tollgate);
    admin.grant_credits("acme", "requests", 500, None, "first").await.unwrap();
    admin.set_recharge("acme", "requests", Some(RechargeAsk::default())).await.unwrap();
    let nodes: Vec<Arc<Harness>> = nodes.into_iter().map(Arc::new).collect();
    let tasks: Vec<_> = nodes
        .iter()
        .map(|n| {
            let n = n.clone();
            tokio::spawn(async move {
                let mut ok = 0u64;
                for _ in 0..100 {
                    match n.status("/", "key-acme").await {
                        200 => ok += 1,
                        s => panic!("status {s}: the balance never runs out here"),
                    }
                }
                ok
            })
        })
        .collect();
    let mut used = 0;
    for t in tasks {
        used += t.await.unwrap();
    }
    assert_eq!(used, 400);
    // Every node delivers what it claimed: one of them, once.
    let mut delivered = 0;
    for n in &nodes {
        delivered += n.tollgate.deliver_recharges().await;
    }
    assert_eq!(delivered, 1, "one recharge across the fleet");
    let invoices = stripe.invoices_created();
    assert_eq!(invoices.len(), 1, "one invoice");
    assert_eq!(invoices[0]["status"], "paid");
    let packs = invoices[0]["amount_paid"].as_u64().unwrap() / 500;
    // Granted once, by `invoice.paid`.
    let handler = nodes[0].tollgate.webhook_handler_with_secrets(vec![Secret::new(SECRET)]).with_api_key(
        Secret::new(API_KEY),
        Some(&stripe.url),
        Duration::from_secs(5),
    );
    let mut credited = 0;
    let events = stripe.take_emitted();
    for e in events.iter().chain(events.iter()) {
        let payload = e.to_string();
        let signature = stripe_webhook::Webhook::generate_test_header(&payload, SECRET, Some(NOON));
        let reply = handler.handle(Some(&signature), payload.as_bytes()).await;
        assert_eq!(reply.status().as_u16(), 200, "{}: {:?}", e["type"], reply.outcome);
        credited += u64::from(matches!(reply.outcome, WebhookOutcome::Credited { .. }));
    }
    assert_eq!(credited, 1, "granted once, every event delivered twice");
    let (_, balances) = admin.credits("acme").await.unwrap();
    let granted: u64 = balances.iter().map(|(_, b)| b.granted).sum();
    assert_eq!(granted, 500 + packs * 100);
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!((view.state.n, view.state.open, view.month_count), (1, None, 1));
    // The claim saw less than 300 left (units used or leased): its packs reach 1,000 from
    // there, at most one pack past it; what was used since comes off.
    assert!((8..=10).contains(&packs), "{packs} packs");
    let balance = granted - used;
    assert!(balance + 300 > 1000 && balance <= 1100, "the balance ends at {balance}");
}

/// Four engines on `store` cross `below` together while the tenant's default payment method is
/// a bank debit: `pay` answers with the invoice still open, its payment processing for days.
/// The one claim waits, marked in the store: with the clock moved past the old 10-minute lapse
/// (and past the hour a failure waits, and two days more), every node spends and delivers, and
/// nothing pays again, counts a failure or voids the invoice in flight. The debit clears:
/// `invoice.paid` grants once. One `pay`, one grant (on main: a second `pay` refused, counted
/// as a failure, the invoice voided, and an hour later a second debit).
pub async fn four_engines_wait_for_a_processing_debit(store: Arc<dyn Store>) {
    let stripe = StandIn::start(&[]).await;
    stripe.add_price("price_pack", None, true);
    stripe.set_unit_amount("price_pack", 500);
    stripe.set_card("cus_acme", Card::BankDebit);
    let nodes = fleet(store.clone(), &stripe).await;
    let admin = Admin::for_engine(&nodes[0].tollgate);
    admin.grant_credits("acme", "requests", 500, None, "first").await.unwrap();
    admin.set_recharge("acme", "requests", Some(RechargeAsk::default())).await.unwrap();
    let nodes: Vec<Arc<Harness>> = nodes.into_iter().map(Arc::new).collect();
    let spend = |n: usize| {
        let nodes = nodes.clone();
        async move {
            let tasks: Vec<_> = nodes
                .iter()
                .map(|node| {
                    let node = node.clone();
                    tokio::spawn(async move {
                        for _ in 0..n {
                            let status = node.status("/", "key-acme").await;
                            assert!(status == 200 || status == 402, "status {status}");
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            let mut delivered = 0;
            for node in &nodes {
                delivered += node.tollgate.deliver_recharges().await;
            }
            delivered
        }
    };
    assert_eq!(spend(90).await, 1, "one claim across the fleet, delivered once");
    assert_eq!(stripe.pays(), 1);
    let invoices = stripe.invoices_created();
    let [invoice] = invoices.as_slice() else { panic!("{invoices:?}") };
    assert_eq!(invoice["status"], "open", "the debit is processing");
    let id = invoice["id"].as_str().unwrap().to_owned();
    for step in [601, 3600, 2 * 86_400] {
        nodes[0].clock.advance(Duration::from_secs(step));
        assert_eq!(spend(5).await, 0, "{step} s on: it waits, nothing delivered again");
    }
    assert_eq!(stripe.pays(), 1, "never paid again");
    let view = admin.recharge("acme", "requests").await.unwrap();
    let open = view.state.open.expect("still open");
    assert_eq!((open.n, open.processing, view.state.failures, view.state.n), (1, true, 0, 1));
    assert_eq!(stripe.invoices_created()[0]["status"], "open", "not voided");
    // Days later the debit clears: `invoice.paid` grants once, and closes it.
    stripe.settle_debit(&id, true);
    let handler = nodes[0].tollgate.webhook_handler_with_secrets(vec![Secret::new(SECRET)]).with_api_key(
        Secret::new(API_KEY),
        Some(&stripe.url),
        Duration::from_secs(5),
    );
    let now = nodes[0].clock.unix_secs();
    let mut credited = 0;
    let events = stripe.take_emitted();
    for e in events.iter().chain(events.iter()) {
        let payload = e.to_string();
        let signature = stripe_webhook::Webhook::generate_test_header(&payload, SECRET, Some(now));
        let reply = handler.handle(Some(&signature), payload.as_bytes()).await;
        assert_eq!(reply.status().as_u16(), 200, "{}: {:?}", e["type"], reply.outcome);
        credited += u64::from(matches!(reply.outcome, WebhookOutcome::Credited { .. }));
    }
    assert_eq!(credited, 1, "granted once");
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!((view.state.open, view.state.n, view.state.failures, view.month_count), (None, 1, 0, 1));
    assert_eq!((stripe.pays(), stripe.invoices_created().len()), (1, 1), "one debit for one crossing");
    let stats: u64 = nodes.iter().map(|n| n.tollgate.stats().recharges_failed).sum();
    assert_eq!(stats, 0, "no failure counted");
}
