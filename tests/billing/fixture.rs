//! What a configuration without dimensions exports, against a fixture written before meters
//! had dimensions (by 04748c2): the JSON lines of a fixed run and the parameters of each
//! Stripe meter event, byte for byte. `TOLLGATE_WRITE_FIXTURE=1` writes the fixture instead.

use std::{sync::Arc, time::Duration};

use crate::common::{stripe::StandIn, stripe::SECRET, NOON};
use tollgate::{
    billing::{JsonlSink, Secret, StripeSink},
    clock::Clock,
    door::{Admission, Credential, RequestInfo},
    store::ExportStore,
    Config, Tollgate,
};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/export_without_dimensions.txt");

const TOML: &str = r#"
[usage]
window = "15m"
grace = "5m"
[meters.requests]
event_name = "api_requests"
[meters.tokens]
event_name = "llm_tokens"
[meters.images]
aggregation = "hour"
[plans.p]
[[routes]]
path = "/generate"
reports = ["tokens", "images"]
[tenants.acme]
plan = "p"
keys = ["key-acme"]
stripe_customer = "cus_acme"
[tenants.globex]
plan = "p"
keys = ["key-globex"]
stripe_customer = "cus_globex"
[stripe]
api_base = "URL"
"#;

/// One run: requests recording tokens and images over three windows, exported through `sink`
/// from a memory store whose identifier namespace is fixed.
async fn run(toml: &str, sink: impl tollgate::billing::BillingSink, at: &dyn Fn(i64)) {
    let store = Arc::new(tollgate::store::MemoryStore::new());
    let current = store.identifier_namespace().await.unwrap();
    assert!(store.set_identifier_namespace(&current, "fixture").await.unwrap());
    let config = Config::from_toml_str(toml).unwrap();
    let (clock, fake) = Clock::fake_at_unix(NOON);
    let (engine, _worker) = Tollgate::builder(config).store_arc(store).clock(clock).billing_sink(sink).build();
    at(NOON);
    for step in 0..3u64 {
        for (key, tokens, images) in [("key-acme", 120 + step, 2), ("key-globex", 7, step), ("key-acme", 33, 0)] {
            let info = RequestInfo::new("POST", "/generate", Credential::ApiKey(key.as_bytes()));
            let ticket = match engine.admit(&info) {
                Admission::Admitted(t) => t,
                Admission::Pending(p) => engine.resolve(p).await.unwrap(),
                Admission::Rejected(r) => panic!("{r}"),
            };
            let ctx = ticket.context();
            ctx.record("tokens", tokens).unwrap();
            ctx.record("images", images).unwrap();
            assert!(ticket.complete(200));
        }
        fake.advance(Duration::from_secs(20 * 60));
        at(NOON + (step as i64 + 1) * 20 * 60);
    }
    fake.advance(Duration::from_secs(3600));
    at(NOON + 2 * 3600);
    engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_configuration_without_dimensions_exports_what_it_exported_before() {
    // The JSON lines.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("usage.jsonl");
    run(&TOML.replace("URL", "http://127.0.0.1:9"), JsonlSink::new(&path), &|_| {}).await;
    let lines = std::fs::read_to_string(&path).unwrap();
    // Stripe's meter events, each one's parameters as sent (sorted: the client's payload is a
    // map).
    let standin = StandIn::start(&[("api_requests", None), ("llm_tokens", None), ("images", Some(3600))]).await;
    let toml = TOML.replace("URL", &standin.url);
    let config = Config::from_toml_str(&toml).unwrap();
    let s = config.stripe().unwrap();
    let sink = StripeSink::new(&Secret::new(SECRET), s.api_base.as_deref(), s.timeout).unwrap();
    run(&toml, sink, &|t| standin.set_now(t)).await;
    let mut forms: Vec<String> = standin.forms().iter().map(|f| serde_json::to_string(f).unwrap()).collect();
    forms.sort();
    let got = format!("# JSON lines\n{lines}# Stripe meter events\n{}\n", forms.join("\n"));
    assert!(lines.lines().count() >= 9, "{lines}");
    if std::env::var_os("TOLLGATE_WRITE_FIXTURE").is_some() {
        std::fs::write(FIXTURE, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(FIXTURE).unwrap();
    assert_eq!(got, want, "what a configuration without dimensions exports changed");
}
