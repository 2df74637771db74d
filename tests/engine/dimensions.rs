//! Dimensions: a meter's units by model and kind, each series priced at its own price, the
//! meter's total and its selectors (`tokens{model=m-large}`) limited, holds priced by the
//! series they name. Through the public API.

use std::{str::FromStr, sync::Arc};

use crate::common;

use common::money::{admit, nanos, SERIES, TOML_DIMENSIONS};
use common::{Harness, NOON};
use tollgate::{
    config::DimensionError,
    money::{ceil_nanos, Decimal, NANOS},
    Dimensions, Overrun, RecordError, RejectionKind,
};

fn series<'a>(model: &'a str, kind: &'a str) -> Dimensions<'a> {
    Dimensions::new().with("model", model).with("kind", kind)
}

/// What tenant `t`'s quota on the total of tokens counts used, as the usage report reads it.
async fn ctx_quota_used(h: &Harness) -> u64 {
    let report = h.tollgate.usage_report(&"t".into(), NOON - 3600, NOON + 3600).await.unwrap();
    report.quotas.iter().find(|q| q.meter.as_str() == "tokens").expect("the total's quota").used
}

async fn recorded(h: &Harness, tenant: &str, meter: &str) -> u64 {
    h.tollgate.flush().await.unwrap();
    common::committed(&**h.tollgate.usage_store(), tenant, meter, NOON - 40 * 86_400, NOON + 86_400, 3600).await
}

/// Nine prices over three models and three kinds: one request records each series, and its
/// spend is the exact decimal sum of what each cost, rounded once for the request; each series
/// counts its own units and the total counts them all.
#[tokio::test]
async fn nine_prices_charge_the_exact_sum_of_what_each_series_costs() {
    let toml = TOML_DIMENSIONS.replace("[meters.requests]\nprice = \"0.000001\"\n", "");
    let h = Harness::new(&toml);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    let mut exact = Decimal::ZERO;
    for (i, (model, kind, price)) in SERIES.iter().enumerate() {
        let units = 1_000 + 317 * i as u64;
        ctx.record_with("tokens", units, &series(model, kind)).unwrap();
        exact += Decimal::from(units) * Decimal::from_str(price).unwrap();
    }
    assert!(ticket.complete(200));
    let expected = ceil_nanos(exact * Decimal::from(NANOS));
    assert_eq!(recorded(&h, "t", "spend").await, expected, "the spend is Σ units × price, to the nano");
    let mut sum = 0;
    for (i, (model, kind, _)) in SERIES.iter().enumerate() {
        let got = recorded(&h, "t", &format!("tokens{{model={model},kind={kind}}}")).await;
        assert_eq!(got, 1_000 + 317 * i as u64, "{model} {kind}");
        sum += got;
    }
    assert!(sum > 0);
    assert_eq!(recorded(&h, "t", "tokens").await, 0, "the total records no usage of its own: billed once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_engines_on_one_memory_store_never_pass_a_spend_cap_priced_by_dimension() {
    common::money::four_engines_never_pass_a_hard_spend_cap_by_dimension(
        Arc::new(tollgate::store::MemoryStore::new()),
        32,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_engines_on_one_sqlite_file_never_pass_a_spend_cap_priced_by_dimension() {
    let dir = tempfile::tempdir().unwrap();
    let store = tollgate::store::SqliteStore::open(dir.path().join("dims.db")).await.unwrap();
    common::money::four_engines_never_pass_a_hard_spend_cap_by_dimension(Arc::new(store), 32).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_engines_on_one_memory_store_keep_a_models_tokens_per_minute() {
    let store: Arc<dyn tollgate::store::StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let whole: Arc<dyn tollgate::store::Store> = store.clone();
    let nodes = std::array::from_fn(|_| common::NodeStore::Whole(whole.clone()));
    common::money::four_nodes_keep_a_models_tokens_per_minute(nodes, store, 32).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_engines_on_one_sqlite_file_keep_a_models_tokens_per_minute() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn tollgate::store::StoreInspect> =
        Arc::new(tollgate::store::SqliteStore::open(dir.path().join("tpm.db")).await.unwrap());
    let whole: Arc<dyn tollgate::store::Store> = store.clone();
    let nodes = std::array::from_fn(|_| common::NodeStore::Whole(whole.clone()));
    common::money::four_nodes_keep_a_models_tokens_per_minute(nodes, store, 32).await;
}

/// A day's tokens of one model: tenant `t` may use 1,000 tokens of `m-large` a day and 5,000
/// tokens in all.
const DAILY: &str = r#"
[meters.tokens]
dimensions = ["model", "kind"]
values.model = ["m-small", "m-large"]
values.kind = ["input", "output"]
[plans.p]
quotas.tokens = { limit = 5000, period = "day" }
quotas."tokens{model=m-large}" = { limit = 1000, period = "day" }
[[routes]]
path = "/generate"
reports = ["tokens"]
[tenants.t]
plan = "p"
keys = ["key-t"]
"#;

/// A per-model limit refuses the model past its limit and serves another model of the same
/// tenant; the meter's total limit holds over both; the next day serves the model again.
#[tokio::test]
async fn a_models_limit_refuses_it_and_serves_another_model() {
    let h = Harness::new(DAILY);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    let mut hold = ctx.hold_in("tokens", &series("m-large", "output"), 800).await.unwrap();
    hold.record(800).unwrap();
    hold.settle();
    assert!(ticket.complete(200));
    let status = |ctx: &tollgate::TenantContext, m: &str| ctx.quota(m).unwrap().remaining;
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    assert_eq!(status(&ctx, "tokens{model=m-large}"), 200);
    assert_eq!(status(&ctx, "tokens"), 4_200);
    let refused = ctx.hold_in("tokens", &series("m-large", "input"), 300).await.unwrap_err();
    assert_eq!(refused.kind(), RejectionKind::QuotaExceeded, "{refused}");
    // Its headers name the model's policy, within RFC 8941 (a string, no braces or `=`).
    assert_eq!(refused.policy(), Some("tokens-m-large-day"));
    let mut headers = Vec::new();
    refused.for_each_header(|f, v| headers.push((f.name().to_ascii_lowercase(), v.to_owned())));
    let header = |n: &str| headers.iter().find(|(f, _)| f == n).map(|(_, v)| v.clone());
    let policy = header("ratelimit-policy").expect("a RateLimit-Policy");
    assert!(policy.contains("\"tokens-m-large-day\";q=1000;w=86400"), "{policy}");
    assert!(!policy.contains('{'), "{policy}");
    assert_eq!(status(&ctx, "tokens{model=m-large}"), 200, "a refused hold holds nothing");
    assert_eq!(status(&ctx, "tokens"), 4_200, "of the total neither");
    // An extension the model's limit refuses takes nothing of the total either.
    let mut hold = ctx.hold_in("tokens", &series("m-large", "output"), 100).await.unwrap();
    assert_eq!((status(&ctx, "tokens"), status(&ctx, "tokens{model=m-large}")), (4_100, 100));
    let refused = hold.extend(150).await.unwrap_err();
    assert_eq!(refused.kind(), RejectionKind::QuotaExceeded, "{refused}");
    assert_eq!((status(&ctx, "tokens"), status(&ctx, "tokens{model=m-large}")), (4_100, 100), "nothing more held");
    drop(hold);
    // Another model of the same tenant is served, within the total.
    let mut small = ctx.hold_in("tokens", &series("m-small", "input"), 3_000).await.unwrap();
    small.record(3_000).unwrap();
    small.settle();
    assert_eq!(status(&ctx, "tokens"), 1_200);
    let over = ctx.hold_in("tokens", &series("m-small", "output"), 1_201).await.unwrap_err();
    assert_eq!(over.kind(), RejectionKind::QuotaExceeded, "the total's limit holds over every model");
    assert!(ticket.complete(200));
    // The next day serves the model again.
    h.clock.advance(std::time::Duration::from_secs(86_400));
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    let mut hold = ctx.hold_in("tokens", &series("m-large", "input"), 300).await.unwrap();
    hold.record(250).unwrap();
    hold.settle();
    assert_eq!(status(&ctx, "tokens{model=m-large}"), 750, "what the hold did not use came back");
    assert!(ticket.complete(200));
}

/// Tokens per minute per model (OpenAI's TPM): tenant `t` may use 1,000 tokens of `m-large` a
/// minute, 3,000 of every model, and a million a day.
const PER_MINUTE: &str = r#"
[meters.tokens]
dimensions = ["model", "kind"]
values.model = ["m-small", "m-large"]
values.kind = ["input", "output"]
[plans.p]
quotas.tokens = { limit = 1000000, period = "day" }
quotas."tokens{model=m-large}" = { limit = 1000, period = "minute" }
quotas."tokens{model=m-small}" = { limit = 3000, period = "minute" }
[[routes]]
path = "/generate"
reports = ["tokens"]
[tenants.t]
plan = "p"
keys = ["key-t"]
"#;

/// A model's tokens per minute: past them the model is refused (429, its policy named with a
/// 60-second window and the seconds to the next minute) while another model of the tenant is
/// served; the next minute serves the model again, with all of its limit, and the day's
/// total counts every minute's tokens.
#[tokio::test]
async fn a_models_tokens_per_minute_refuse_it_until_the_next_minute_and_serve_another() {
    let h = Harness::new(PER_MINUTE);
    // 20 seconds into a minute.
    h.clock.advance(std::time::Duration::from_secs(20));
    let status = |ctx: &tollgate::TenantContext, m: &str| ctx.quota(m).unwrap().remaining;
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    let mut hold = ctx.hold_in("tokens", &series("m-large", "output"), 900).await.unwrap();
    hold.record(900).unwrap();
    hold.settle();
    assert_eq!(status(&ctx, "tokens{model=m-large}"), 100);
    let refused = ctx.hold_in("tokens", &series("m-large", "input"), 101).await.unwrap_err();
    assert_eq!(refused.kind(), RejectionKind::QuotaExceeded, "{refused}");
    assert_eq!(refused.policy(), Some("tokens-m-large-minute"));
    let mut headers = Vec::new();
    refused.for_each_header(|f, v| headers.push((f.name().to_ascii_lowercase(), v.to_owned())));
    let header = |n: &str| headers.iter().find(|(f, _)| f == n).map(|(_, v)| v.clone());
    let policy = header("ratelimit-policy").expect("a RateLimit-Policy");
    assert!(policy.contains("\"tokens-m-large-minute\";q=1000;w=60"), "{policy}");
    assert_eq!(header("retry-after").as_deref(), Some("40"), "the next minute, 40 seconds away");
    // Another model of the same tenant is served in the same minute.
    let mut small = ctx.hold_in("tokens", &series("m-small", "input"), 2_500).await.unwrap();
    small.record(2_500).unwrap();
    small.settle();
    assert!(ticket.complete(200));
    // The next minute: the model's whole limit again; the day counts both minutes.
    h.clock.advance(std::time::Duration::from_secs(40));
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    assert_eq!(status(&ctx, "tokens{model=m-large}"), 1_000, "a new minute, a new limit");
    assert_eq!(status(&ctx, "tokens{model=m-small}"), 3_000);
    let mut hold = ctx.hold_in("tokens", &series("m-large", "input"), 1_000).await.unwrap();
    hold.record(600).unwrap();
    hold.settle();
    assert_eq!(status(&ctx, "tokens{model=m-large}"), 400, "what the hold did not use came back");
    assert_eq!(status(&ctx, "tokens"), 1_000_000 - 900 - 2_500 - 600, "the day counts every minute");
    assert!(ticket.complete(200));
    // A hold taken in one minute and settled in the next counts in the minute it was taken:
    // the new minute's limit is whole.
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    let mut hold = ctx.hold_in("tokens", &series("m-large", "output"), 300).await.unwrap();
    h.clock.advance(std::time::Duration::from_secs(60));
    hold.record(300).unwrap();
    hold.settle();
    assert!(ticket.complete(200));
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    assert_eq!(status(&ctx, "tokens{model=m-large}"), 1_000, "the hold's minute took its tokens");
    assert!(ticket.complete(200));
    assert_eq!(
        recorded(&h, "t", "tokens{model=m-large,kind=output}").await
            + recorded(&h, "t", "tokens{model=m-large,kind=input}").await,
        900 + 600 + 300,
        "every token billed once"
    );
}

/// A stream held open across the end of its minute holds that minute's tokens, never the
/// next's: the next minute spent is refused as spent (`QuotaExceeded`, retry at the next
/// minute), not as held by others (`UnitsHeld`, retry in a second), and its usage shows nothing
/// held.
#[tokio::test]
async fn a_stream_open_across_minutes_holds_nothing_of_the_next() {
    let h = Harness::new(PER_MINUTE);
    h.clock.advance(std::time::Duration::from_secs(50));
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    let mut stream = ctx.hold_in("tokens", &series("m-large", "output"), 500).await.unwrap();
    stream.record(100).unwrap();
    // The next minute: the stream is still open, and nothing of the new minute is held.
    h.clock.advance(std::time::Duration::from_secs(20));
    let report = h.tollgate.usage_report(&"t".into(), NOON, NOON + 3600).await.unwrap();
    let minute = report.quotas.iter().find(|q| q.meter.as_str() == "tokens{model=m-large}").unwrap();
    assert_eq!((minute.start, minute.held, minute.remaining), (NOON + 60, 0, 1_000), "{minute:?}");
    let (ticket2, ctx2) = admit(&h, "key-t").await.unwrap();
    // Another request holds 300 of the new minute and a third spends the other 700: the
    // stream's extension is refused as held by the other (it may end soon), not as spent.
    let mut other = ctx2.hold_in("tokens", &series("m-large", "input"), 300).await.unwrap();
    let mut all = ctx2.hold_in("tokens", &series("m-large", "input"), 700).await.unwrap();
    all.record(700).unwrap();
    all.settle();
    let held = stream.extend(200).await.unwrap_err();
    assert_eq!(held.kind(), RejectionKind::UnitsHeld, "{held}");
    other.record(300).unwrap();
    other.settle();
    let refused = ctx2.hold_in("tokens", &series("m-large", "input"), 10).await.unwrap_err();
    assert_eq!(refused.kind(), RejectionKind::QuotaExceeded, "{refused}");
    let mut headers = Vec::new();
    refused.for_each_header(|f, v| headers.push((f.name().to_ascii_lowercase(), v.to_owned())));
    let retry = headers.iter().find(|(f, _)| f == "retry-after").map(|(_, v)| v.clone());
    assert_eq!(retry.as_deref(), Some("50"), "the next minute, 50 seconds away");
    let report = h.tollgate.usage_report(&"t".into(), NOON, NOON + 3600).await.unwrap();
    let minute = report.quotas.iter().find(|q| q.meter.as_str() == "tokens{model=m-large}").unwrap();
    assert_eq!((minute.start, minute.held, minute.remaining), (NOON + 60, 0, 0), "{minute:?}");
    stream.record(200).unwrap();
    stream.settle();
    assert!(ticket.complete(200));
    assert!(ticket2.complete(200));
}

/// A spend cap in money: a hold for `max_tokens` of the expensive model is refused where the
/// cheap model's fits; settled at a mix (input beside the hold, output through it), the spend
/// is what the mix cost and the rest of the hold comes back exactly.
#[tokio::test]
async fn a_hold_holds_its_models_price_and_settles_at_the_mix() {
    let toml = TOML_DIMENSIONS
        .replace("[meters.requests]\nprice = \"0.000001\"\n", "")
        .replace("limit = \"1.00\"", "limit = \"0.01\"");
    let h = Harness::new(&toml);
    let spend = |ctx: &tollgate::TenantContext| ctx.quota("spend").unwrap().remaining;
    // Half the cap spent: 500 output tokens of m-large (0.005).
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    ctx.record_with("tokens", 500, &series("m-large", "output")).unwrap();
    assert!(ticket.complete(200));
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    assert_eq!(spend(&ctx), NANOS / 200);
    // 600 output tokens: 0.006 of m-large, past what is left; 0.00036 of m-small.
    let large = ctx.hold_in_with("tokens", &series("m-large", "output"), 600, Overrun::Refuse).await.unwrap_err();
    assert_eq!(large.kind(), RejectionKind::SpendCapReached, "{large}");
    assert_eq!(spend(&ctx), NANOS / 200, "the refused hold holds nothing");
    let small = ctx.hold_in_with("tokens", &series("m-small", "output"), 600, Overrun::Refuse).await.unwrap();
    assert_eq!(spend(&ctx), NANOS / 200 - nanos(600, "0.0000006"), "the cheap model's estimate is held");
    drop(small);
    assert_eq!(spend(&ctx), NANOS / 200, "and given back whole");
    // A mix: 400 output tokens of m-large held (0.004), 300 input recorded beside the hold
    // (0.00075), 100 output through it (0.001).
    let mut hold = ctx.hold_in_with("tokens", &series("m-large", "output"), 400, Overrun::Refuse).await.unwrap();
    assert_eq!(spend(&ctx), NANOS / 200 - nanos(400, "0.00001"));
    ctx.record_with("tokens", 300, &series("m-large", "input")).unwrap();
    hold.record(100).unwrap();
    hold.settle();
    let mix = nanos(300, "0.0000025") + nanos(100, "0.00001");
    assert_eq!(spend(&ctx), NANOS / 200 - mix, "what the mix cost, the rest of the hold back");
    assert!(ticket.complete(200));
    assert_eq!(recorded(&h, "t", "spend").await, NANOS / 200 + mix);
    assert_eq!(recorded(&h, "t", "tokens{model=m-large,kind=output}").await, 600);
    assert_eq!(recorded(&h, "t", "tokens{model=m-large,kind=input}").await, 300);
    assert_eq!(recorded(&h, "t", "tokens").await, 0, "the series are the usage");
}

/// Values a list lacks and missing dimensions are refused (a 400 to answer, nothing counted)
/// by default, or counted under `other`; a selector is never recorded itself.
#[tokio::test]
async fn values_a_list_lacks_are_refused_or_counted_under_other() {
    let h = Harness::new(DAILY);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    let e = ctx.record_with("tokens", 5, &series("m-huge", "input")).unwrap_err();
    assert_eq!(
        e,
        RecordError::Dimension(DimensionError::UnknownValue { dimension: "model".into(), value: "m-huge".into() })
    );
    let r = ctx.refusal("tokens", &e).expect("a 400 to answer");
    assert_eq!((r.kind(), r.status().as_u16()), (RejectionKind::InvalidDimension, 400));
    let e = ctx.record_with("tokens", 5, &Dimensions::new().with("model", "m-small")).unwrap_err();
    assert_eq!(e, RecordError::Dimension(DimensionError::Missing("kind".into())));
    let e = ctx.record("tokens", 5).unwrap_err();
    assert!(matches!(e, RecordError::Dimension(DimensionError::Missing(_))), "{e}");
    let e = ctx.record_with("tokens", 5, &series("m-small", "input").with("region", "eu")).unwrap_err();
    assert_eq!(e, RecordError::Dimension(DimensionError::UnknownDimension("region".into())));
    let e = ctx.record("tokens{model=m-large}", 5).unwrap_err();
    assert!(matches!(e, RecordError::Dimension(DimensionError::Invalid(_))), "{e}");
    let r = ctx.hold_in("tokens", &series("m-huge", "input"), 10).await.unwrap_err();
    assert_eq!(r.kind(), RejectionKind::InvalidDimension);
    // A series named whole is a series.
    ctx.record("tokens{model=m-small,kind=output}", 7).unwrap();
    assert!(ticket.complete(200));
    assert_eq!(recorded(&h, "t", "tokens{model=m-small,kind=output}").await, 7, "only the series recorded");
    assert_eq!(ctx_quota_used(&h).await, 7, "and the total's quota counts it");

    let other = DAILY.replace(
        "values.kind = [\"input\", \"output\"]",
        "values.kind = [\"input\", \"output\"]\non_unknown = \"other\"",
    );
    let h = Harness::new(&other);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    ctx.record_with("tokens", 5, &series("m-huge", "input")).unwrap();
    ctx.record("tokens", 3).unwrap();
    assert!(ticket.complete(200));
    assert_eq!(recorded(&h, "t", "tokens{model=other,kind=input}").await, 5);
    assert_eq!(recorded(&h, "t", "tokens{model=other,kind=other}").await, 3);
    assert_eq!(recorded(&h, "t", "tokens").await, 0);
}

/// Units recorded on a dimensioned meter are billed by series: the usage report lists each
/// series under its own id, and the meter's total beside them.
#[tokio::test]
async fn the_usage_report_lists_each_series_and_the_total() {
    let h = Harness::new(DAILY);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    ctx.record_with("tokens", 40, &series("m-large", "output")).unwrap();
    ctx.record_with("tokens", 2, &series("m-small", "input")).unwrap();
    assert!(ticket.complete(200));
    h.tollgate.flush().await.unwrap();
    let report = h.tollgate.usage_report(&"t".into(), NOON - 3600, NOON + 3600).await.unwrap();
    let used = |m: &str| report.usage.iter().filter(|w| w.meter.as_str() == m).map(|w| w.quantity).sum::<u64>();
    assert_eq!(used("tokens{model=m-large,kind=output}"), 40);
    assert_eq!(used("tokens{model=m-small,kind=input}"), 2);
    assert_eq!((used("tokens{model=m-large}"), used("tokens")), (0, 0), "the series are the usage");
    let quota = report.quotas.iter().find(|q| q.meter.as_str() == "tokens{model=m-large}").unwrap();
    assert_eq!((quota.used, quota.limit), (40, 1_000));
}

/// The tenant's usage route lists each series and selector with its meter and values beside
/// its id (valid against docs/usage.schema.json); the total carries neither.
#[tokio::test]
async fn the_usage_route_shows_each_series_with_its_values() {
    let h = Harness::new(DAILY);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    ctx.record_with("tokens", 40, &series("m-large", "output")).unwrap();
    ctx.record_with("tokens", 2, &series("m-small", "input")).unwrap();
    assert!(ticket.complete(200));
    h.tollgate.flush().await.unwrap();
    let request = http::Request::builder().uri("/v1/usage").header("x-api-key", "key-t").body(()).unwrap();
    let response = h.tollgate.tenant_usage(&request).await;
    assert_eq!(response.status(), 200);
    common::check_usage_schema(&[response.body().clone()]);
    let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    let find = |list: &str, meter: &str| {
        body[list]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["meter"] == meter)
            .cloned()
            .unwrap_or_else(|| panic!("{meter}"))
    };
    let series = find("usage", "tokens{model=m-large,kind=output}");
    assert_eq!(series["of"], "tokens");
    assert_eq!(series["dimensions"], serde_json::json!({ "model": "m-large", "kind": "output" }));
    assert_eq!(series["current"], 40);
    assert!(body["usage"].as_array().unwrap().iter().all(|u| u["meter"] != "tokens"), "no usage of the total's own");
    let total = find("quotas", "tokens");
    assert_eq!((total["used"].as_u64(), total.get("of")), (Some(42), None));
    let selector = find("quotas", "tokens{model=m-large}");
    assert_eq!(selector["dimensions"], serde_json::json!({ "model": "m-large" }));
    assert_eq!((selector["used"].as_u64(), selector["limit"].as_u64()), (Some(40), Some(1_000)));
}

/// A spend cap the series' prices feed refuses, at admission, the next requests of a route
/// that reports the meter with dimensions, as it does a route reporting a priced meter.
#[tokio::test]
async fn a_spent_cap_refuses_the_next_requests_of_a_route_reporting_the_meter() {
    let toml = TOML_DIMENSIONS
        .replace("[meters.requests]\nprice = \"0.000001\"\n", "")
        .replace("limit = \"1.00\"", "limit = \"0.01\"");
    let h = Harness::new(&toml);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    // The whole cap and more: 1,001 output tokens of m-large (0.01001), recorded as debt.
    ctx.record_with("tokens", 1_001, &series("m-large", "output")).unwrap();
    assert!(ticket.complete(200));
    let refused = admit(&h, "key-t").await.unwrap_err();
    assert_eq!(refused.kind(), RejectionKind::SpendCapReached, "{refused}");
    assert!(admit(&h, "key-u").await.is_ok(), "another tenant is served");
}

/// Usage events name no dimension values: an event of a meter with dimensions, of a series or
/// of a selector is refused, nothing counted.
#[tokio::test]
async fn usage_events_of_a_meter_with_dimensions_are_refused() {
    use tollgate::events::{Event, EventError};
    let h = Harness::new(DAILY);
    for meter in ["tokens", "tokens{model=m-large,kind=output}", "tokens{model=m-large}"] {
        let e = Event::new(
            "e1",
            "t".into(),
            meter.into(),
            5,
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(NOON as u64),
        );
        let err = h.tollgate.record_event(e).await.unwrap_err();
        assert!(matches!(err, EventError::Malformed(ref m) if m.contains("has dimensions")), "{meter}: {err}");
    }
    assert_eq!(recorded(&h, "t", "tokens{model=m-large,kind=output}").await, 0);
}

/// A meter given dimensions keeps the windows it recorded before: they are exported as they
/// were, under its own id, and its series from then on; nothing is parked or billed twice.
#[tokio::test]
async fn a_meter_given_dimensions_exports_its_windows_from_before() {
    use tollgate::{billing::JsonlSink, clock::Clock, Config, Tollgate};
    const BEFORE: &str = r#"
[usage]
window = "15m"
grace = "5m"
[meters.tokens]
[plans.p]
[[routes]]
path = "/generate"
reports = ["tokens"]
[tenants.t]
plan = "p"
keys = ["key-t"]
stripe_customer = "cus_t"
"#;
    let after = BEFORE.replace(
        "[meters.tokens]\n",
        "[meters.tokens]\ndimensions = [\"model\"]\nvalues.model = [\"m-small\", \"m-large\"]\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("usage.jsonl");
    let store = Arc::new(tollgate::store::MemoryStore::new());
    let (clock, fake) = Clock::fake_at_unix(NOON);
    let record = |engine: &Tollgate, dims: Option<&'static str>| {
        let engine = engine.clone();
        async move {
            let info =
                tollgate::door::RequestInfo::new("POST", "/generate", tollgate::door::Credential::ApiKey(b"key-t"));
            let ticket = crate::common::admitted_ticket(&engine, &info).await;
            match dims {
                None => ticket.context().record("tokens", 11).unwrap(),
                Some(m) => ticket.context().record_with("tokens", 5, &Dimensions::new().with("model", m)).unwrap(),
            }
            assert!(ticket.complete(200));
        }
    };
    // Before: 11 tokens, flushed, not exported yet.
    let (engine, _worker) =
        Tollgate::builder(Config::from_toml_str(BEFORE).unwrap()).store_arc(store.clone()).clock(clock.clone()).build();
    record(&engine, None).await;
    engine.flush().await.unwrap();
    drop(engine);
    // After: the meter has dimensions; 5 tokens of m-large; everything exported.
    let (engine, _worker) = Tollgate::builder(Config::from_toml_str(&after).unwrap())
        .store_arc(store.clone())
        .clock(clock)
        .billing_sink(JsonlSink::new(&path))
        .build();
    record(&engine, Some("m-large")).await;
    fake.advance(std::time::Duration::from_secs(3 * 3600));
    engine.shutdown().await.unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let tokens: Vec<_> = lines.iter().filter(|l| l["event_name"] == "tokens").collect();
    assert_eq!(tokens.len(), 2, "{text}");
    let of = |meter: &str| tokens.iter().find(|l| l["meter"] == meter).unwrap_or_else(|| panic!("{meter}: {text}"));
    assert_eq!(of("tokens")["value"], 11, "the window from before, as it was");
    assert!(of("tokens").get("dimensions").is_none());
    assert_eq!(of("tokens{model=m-large}")["value"], 5);
    assert_eq!(of("tokens{model=m-large}")["dimensions"], serde_json::json!({ "model": "m-large" }));
    use tollgate::store::ExportStore as _;
    assert!(store.dead_letters(None, 10).await.unwrap().is_empty(), "nothing parked");
}

/// Holds on a series count toward the caps on open holds once each, whatever holds its units:
/// with a soft spend cap, the total's hard quota's hold counts.
#[tokio::test]
async fn a_dimensioned_hold_counts_once_toward_the_open_holds_cap() {
    let toml = TOML_DIMENSIONS
        .replace("mode = \"hard\", max_limit = \"10.00\"", "mode = \"soft\"")
        .replace("[plans.p]\n", "[limits]\nmax_holds_per_tenant = 2\n[plans.p]\n");
    let h = Harness::new(&toml);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    let a = ctx.hold_in("tokens", &series("m-small", "input"), 10).await.unwrap();
    let b = ctx.hold_in("tokens", &series("m-large", "output"), 10).await.unwrap();
    let c = ctx.hold_in("tokens", &series("m-medium", "input"), 10).await.unwrap_err();
    assert_eq!(c.kind(), RejectionKind::UnitsHeld, "{c}");
    drop((a, b));
    assert!(ticket.complete(200));
}

/// A record through a hold refused past a model's limit is answered with that limit's
/// policy, not the meter's total's.
#[tokio::test]
async fn an_overrun_refused_by_a_models_limit_names_it() {
    let h = Harness::new(DAILY);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    let mut hold = ctx.hold_in_with("tokens", &series("m-large", "output"), 1_000, Overrun::Refuse).await.unwrap();
    let e = hold.record(1_001).unwrap_err();
    assert_eq!(e, RecordError::Overrun(1));
    let r = ctx.refusal("tokens", &e).expect("a refusal to answer");
    assert_eq!((r.kind(), r.policy()), (RejectionKind::QuotaExceeded, Some("tokens-m-large-day")), "{r}");
    hold.record(1_000).unwrap();
    hold.settle();
    assert!(ticket.complete(200));
}

/// A route's hold reads the model from a request header (`hold_values`): the route holds the
/// model's series, its total and its selector before the handler runs, so a model past its
/// limit is refused 429 before any work while another model is served; a model the list lacks,
/// or none, is refused 400 before anything is taken; the handler's record of `tokens` without
/// values is of the held series.
#[tokio::test]
async fn a_routes_hold_reads_the_model_from_a_header() {
    let toml = DAILY.replace(
        "[[routes]]\npath = \"/generate\"\nreports = [\"tokens\"]\n",
        "[[routes]]\npath = \"/generate\"\nreports = [\"tokens\"]\n\
         [[routes]]\npath = \"/tokens/{n}\"\nreports = [\"tokens\"]\n\
         hold.tokens = { header = \"x-max-tokens\", default = 100, max = 5000 }\n\
         hold_values = { model = { header = \"x-model\" }, kind = \"output\" }\n",
    );
    let h = Harness::new(&toml);
    let send = |tokens: u64, model: Option<&'static str>, max: u64| {
        let mut r = common::req("POST", &format!("/tokens/{tokens}"), Some("key-t"), None);
        r.headers_mut().insert("x-max-tokens", max.into());
        if let Some(m) = model {
            r.headers_mut().insert("x-model", http::HeaderValue::from_static(m));
        }
        h.send(r)
    };
    assert_eq!(send(800, Some("m-large"), 1_000).await.status, 200);
    let refused = send(100, Some("m-large"), 300).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.rejection.as_ref().and_then(|r| r.policy()), Some("tokens-m-large-day"));
    assert_eq!(send(250, Some("m-small"), 300).await.status, 200, "another model is served");
    for model in [Some("m-huge"), None] {
        let bad = send(10, model, 100).await;
        assert_eq!(bad.status, 400, "{model:?}");
        assert_eq!(bad.rejection.as_ref().map(|r| r.kind()), Some(RejectionKind::InvalidDimension));
        assert_eq!(bad.header("content-type"), Some("application/problem+json"));
    }
    assert_eq!(recorded(&h, "t", "tokens{model=m-large,kind=output}").await, 800);
    assert_eq!(recorded(&h, "t", "tokens{model=m-small,kind=output}").await, 250);
    assert_eq!(ctx_quota_used(&h).await, 1_050, "the total counts both, and nothing of the refused");
}

/// A route's hold reads the model from a parameter of its path (`{ path = "model" }`), as the
/// routers see it (escapes decoded): held and recorded in that model's series; a model the
/// list lacks is refused 400 before anything is taken. A parameter the path lacks is refused
/// at load, by key.
#[tokio::test]
async fn a_routes_hold_reads_the_model_from_its_path() {
    let route = |values: &str| {
        DAILY.replace(
            "[[routes]]\npath = \"/generate\"\nreports = [\"tokens\"]\n",
            &format!(
                "[[routes]]\npath = \"/generate\"\nreports = [\"tokens\"]\n\
                 [[routes]]\npath = \"/tokens/{{n}}/{{model}}\"\nreports = [\"tokens\"]\n\
                 hold.tokens = 100\nhold_values = {values}\n"
            ),
        )
    };
    let h = Harness::new(&route("{ model = { path = \"model\" }, kind = \"output\" }"));
    let send = |path: &'static str| h.send(common::req("POST", path, Some("key-t"), None));
    assert_eq!(send("/tokens/30/m-large").await.status, 200);
    assert_eq!(send("/tokens/5/m%2Dsmall").await.status, 200, "an escape is decoded as the routers decode it");
    let bad = send("/tokens/7/m-huge").await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.rejection.as_ref().map(|r| r.kind()), Some(RejectionKind::InvalidDimension));
    assert_eq!(bad.header("content-type"), Some("application/problem+json"));
    assert_eq!(recorded(&h, "t", "tokens{model=m-large,kind=output}").await, 30);
    assert_eq!(recorded(&h, "t", "tokens{model=m-small,kind=output}").await, 5);
    assert_eq!(ctx_quota_used(&h).await, 35, "nothing of the refused");

    for (values, key) in [
        ("{ model = { path = \"mode\" }, kind = \"output\" }", "routes[1].hold_values.model.path"),
        ("{ model = { path = \"n\", header = \"x-model\" }, kind = \"output\" }", "routes[1].hold_values.model"),
    ] {
        let err = tollgate::Config::from_toml_str(&route(values)).unwrap_err();
        assert_eq!(err.key(), key, "{err}");
    }
}

/// The values a route's hold read are the handler's to check: `held_values` gives them (a
/// handler serving the model a body names compares it).
#[tokio::test]
async fn the_handler_sees_the_values_its_routes_hold_read() {
    let toml = DAILY.replace(
        "[[routes]]\npath = \"/generate\"\nreports = [\"tokens\"]\n",
        "[[routes]]\npath = \"/generate\"\nreports = [\"tokens\"]\n\
         hold.tokens = { header = \"x-max-tokens\", default = 100, max = 5000 }\n\
         hold_values = { model = { header = \"x-model\" }, kind = \"output\" }\n",
    );
    let h = Harness::new(&toml);
    let headers: [(&str, &[u8]); 2] = [("x-model", b"m-large"), ("x-max-tokens", b"100")];
    let info = tollgate::door::RequestInfo::new("POST", "/generate", tollgate::door::Credential::ApiKey(b"key-t"))
        .with_headers(&headers);
    let ticket = crate::common::admitted_ticket(&h.tollgate, &info).await;
    let ctx = ticket.context();
    assert_eq!(
        ctx.held_values(),
        vec![("model".to_owned(), "m-large".to_owned()), ("kind".to_owned(), "output".to_owned())]
    );
    ctx.record("tokens", 40).unwrap();
    assert!(ticket.complete(200));
    assert_eq!(recorded(&h, "t", "tokens{model=m-large,kind=output}").await, 40);
    // Without the header: refused before anything is taken.
    let refused = admit(&h, "key-t").await.unwrap_err();
    assert_eq!(refused.kind(), RejectionKind::InvalidDimension);
}
