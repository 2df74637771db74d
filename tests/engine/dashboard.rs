//! The operator dashboard through its public API (`Dashboard::respond`): the token rule, each
//! page over a seeded store, every string from the store escaped, bad input.

use std::sync::Arc;

use bytes::Bytes;
use tollgate::{
    admin::{Admin, KEY_SCAN_TENANTS, MAX_SEARCH_LEN},
    config::DashboardToken,
    dashboard::{Access, Dashboard, CONTENT_SECURITY_POLICY},
    store::{
        AlertKey, ApiKeyRecord, CreditGrant, DirectoryStore, ExportStore, FlushId, MemoryStore, OutboxEntry,
        OutboxStore, QuotaStore, Tally, TallyScope, TenantRecord, UsageBatch, UsageRecord, UsageStore,
    },
    Config, Tollgate,
};

const TOKEN: &str = "dashboard-token-0123456789-abcdefgh";
/// Markup in every string a store may hold: shown as text, it never opens a tag.
const MARK: &str = "<i>x</i>\"'";

fn config() -> Config {
    Config::from_toml_str(
        r#"
[store]
kind = "memory"
[meters.requests]
[meters.credits]
[plans.free]
rate = "2/s"
burst = 2
quotas.requests = { limit = 100, period = "day", mode = "hard" }
[plans.pro]
rate = "50/s"
quotas.credits = { period = "prepaid" }
[[routes]]
method = "POST"
path = "/v1/generate"
meter = "credits"
"#,
    )
    .unwrap()
}

fn token() -> Access {
    Access::Token(DashboardToken::new(TOKEN).unwrap())
}

async fn get(d: &Dashboard, path: &str, auth: bool) -> http::Response<Bytes> {
    let mut r = http::Request::get(path);
    if auth {
        r = r.header("authorization", format!("Bearer {TOKEN}"));
    }
    d.respond("/ops", r.body(Bytes::new()).unwrap()).await
}

fn text(r: &http::Response<Bytes>) -> String {
    String::from_utf8(r.body().to_vec()).unwrap()
}

/// A store holding markup in every string it keeps, with the engine over it.
async fn seeded() -> (Tollgate, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::new());
    let (engine, _worker) = Tollgate::builder(config()).store_arc(store.clone()).build();
    let now = engine.clock().unix_secs();
    let hostile = TenantRecord::new(MARK.into(), "pro".into())
        .with_customer(format!("cus{MARK}"))
        .with_metronome_customer(format!("m{MARK}"));
    store.put_tenant(&hostile, &[]).await.unwrap();
    store.put_tenant(&TenantRecord::new("acme".into(), "free".into()), &[]).await.unwrap();
    let hash = tollgate::store::KeyHash::of(b"tg_live_0123456789abcdefghijklmnopqrstuv");
    store
        .put_key(
            &ApiKeyRecord::new(hash, MARK.into(), now).with_prefix(format!("tg_live_{MARK}")),
            tollgate::store::KeyWrite::Upsert,
        )
        .await
        .unwrap();
    store.grant_credits(&CreditGrant::new(MARK.into(), "credits".into(), format!("g{MARK}"), 50, now)).await.unwrap();
    // Its requests of today as the nodes' tallies count them: the overview's top tenants.
    let tallies = vec![
        Tally::new(TallyScope::Fleet, now - now % 60, vec![("admitted".into(), 7), ("rate_limited".into(), 1)]),
        Tally::new(
            TallyScope::Tenant(MARK.into()),
            now - now % 86_400,
            vec![("admitted".into(), 7), ("rate_limited".into(), 1)],
        ),
        // Tomorrow's too: a page read past midnight UTC shows it all the same.
        Tally::new(TallyScope::Tenant(MARK.into()), now - now % 86_400 + 86_400, vec![("admitted".into(), 1)]),
    ];
    let batch = UsageBatch::new(
        FlushId::new("b1"),
        vec![
            UsageRecord::new(MARK.into(), "requests".into(), now - now % 3600, 7),
            UsageRecord::new("acme".into(), "requests".into(), now - now % 3600 - 3600, 3),
        ],
    )
    .with_tallies(tallies);
    store.commit_usage(&batch).await.unwrap();
    let pending = store.pending_exports(now + 3600, None, 10).await.unwrap();
    let window = pending.iter().find(|a| a.key.tenant.as_str() == MARK).unwrap();
    store.dead_letter(window, &format!("refused: {MARK}")).await.unwrap();
    let alert = OutboxEntry::new(
        AlertKey::new(format!("a{MARK}"), format!("https://h.example/{MARK}?token=secret")),
        MARK.into(),
        format!("quota.{MARK}"),
        "{}",
        now,
        now + 86_400,
    );
    store.put_alerts(&[alert]).await.unwrap();
    let change = tollgate::store::AuditRecord::new(
        MARK.into(),
        now * 1_000,
        tollgate::store::Actor::Operator(format!("o{MARK}")),
        tollgate::store::Setting::Overrides,
        Some(format!("b{MARK}")),
        Some(format!("v{MARK}")),
    );
    tollgate::store::AuditStore::append_audit(&*store, &change).await.unwrap();
    (engine, store)
}

#[tokio::test]
async fn without_the_token_nothing_is_rendered_and_the_login_sets_a_session() {
    let (engine, _store) = seeded().await;
    let d = Dashboard::for_engine(&engine, token());
    for path in ["/", "/plans", "/billing", "/alerts", "/node", "/tenants/acme"] {
        let r = get(&d, path, false).await;
        assert_eq!(r.status(), 401, "{path}");
        assert!(r.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer"));
        let body = text(&r);
        assert!(body.contains("name=\"token\"") && !body.contains("acme") && !body.contains("&lt;i&gt;"), "{path}");
        assert_eq!(r.headers()["content-security-policy"], CONTENT_SECURITY_POLICY);
    }
    let login = |body: &'static str| {
        http::Request::post("/login")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Bytes::from(body))
            .unwrap()
    };
    assert_eq!(d.respond("/ops", login("token=wrong-token-0123456789")).await.status(), 401);
    assert_eq!(d.respond("/ops", login("other=1")).await.status(), 401);
    let big = Bytes::from(vec![b'a'; tollgate::dashboard::MAX_BODY + 1]);
    assert_eq!(d.respond("/ops", http::Request::post("/login").body(big).unwrap()).await.status(), 413);
    let r = d.respond("/ops", login("token=dashboard-token-0123456789-abcdefgh")).await;
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ops/");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && cookie.contains("Path=/ops"));
    assert!(!cookie.contains(TOKEN), "the cookie is not the token");
    let session = cookie.split(';').next().unwrap().to_owned();
    let r = d.respond("/ops", http::Request::get("/").header("cookie", session).body(Bytes::new()).unwrap()).await;
    assert_eq!(r.status(), 200);
    // The stylesheet has no data: served to anyone.
    let css = get(&d, "/assets/dashboard.css", false).await;
    assert_eq!(
        (css.status().as_u16(), css.headers()["content-type"].to_str().unwrap()),
        (200, "text/css; charset=utf-8")
    );
    // Read-only: no other method.
    let put = d.respond("/ops", http::Request::put("/").body(Bytes::new()).unwrap()).await;
    assert_eq!((put.status().as_u16(), put.headers()["allow"].to_str().unwrap()), (405, "GET, HEAD"));
    let head = d
        .respond(
            "/ops",
            http::Request::head("/").header("authorization", format!("Bearer {TOKEN}")).body(Bytes::new()).unwrap(),
        )
        .await;
    assert_eq!(head.status(), 200);
    assert!(head.body().is_empty());
}

#[tokio::test]
async fn every_string_from_the_store_is_escaped_on_every_page() {
    let (engine, _store) = seeded().await;
    let d = Dashboard::for_engine(&engine, token());
    let id = "%3Ci%3Ex%3C%2Fi%3E%22%27";
    let escaped = "&lt;i&gt;x&lt;/i&gt;&quot;&#39;";
    for path in [
        "/".to_owned(),
        "/tenants".to_owned(),
        "/billing".to_owned(),
        "/alerts".to_owned(),
        "/node".to_owned(),
        "/audit".to_owned(),
        format!("/tenants/{id}"),
    ] {
        let r = get(&d, &path, true).await;
        assert_eq!(r.status(), 200, "{path}");
        let body = text(&r);
        assert!(!body.contains("<i>") && !body.contains("</i>"), "{path}: markup from the store");
        assert!(!body.contains("<script"), "{path}");
        if path != "/node" {
            assert!(body.contains(escaped), "{path}: the value shown as text");
        }
    }
    let tenant = text(&get(&d, &format!("/tenants/{id}"), true).await);
    for shown in [format!("cus{escaped}"), format!("m{escaped}"), format!("tg_live_{escaped}"), format!("g{escaped}")] {
        assert!(tenant.contains(&shown), "{shown}");
    }
    let billing = text(&get(&d, "/billing", true).await);
    assert!(billing.contains(&format!("refused: {escaped}")));
    // Identifiers carry line-break opportunities (`<wbr>`) between their parts.
    let alerts = text(&get(&d, "/alerts", true).await).replace("<wbr>", "");
    assert!(alerts.contains(&format!("a{escaped}")) && alerts.contains(&format!("quota.{escaped}")));
    assert!(!alerts.contains("secret"), "a destination's query is not shown");
    for page in [text(&get(&d, "/audit", true).await), tenant] {
        let page = page.replace("<wbr>", "");
        for shown in [format!("operator:o{escaped}"), format!("b{escaped}"), format!("v{escaped}")] {
            assert!(page.contains(&shown), "{shown}");
        }
    }
}

/// The audit's page lists the fleet's changes newest first, 100 to a page with a link to the
/// older ones, or one tenant's; a tenant's page shows its last 10 and links to the rest; an
/// address's cursor that is not one reads the first page.
#[tokio::test]
async fn the_audit_page_lists_changes_newest_first_in_pages() {
    let (engine, _store) = seeded().await;
    let admin = tollgate::admin::Admin::for_engine(&engine).operator("ana");
    admin.add_tenant("t1", "free", None).await.unwrap();
    admin.add_tenant("t2", "free", None).await.unwrap();
    for i in 0..52 {
        let plan = if i % 2 == 0 { "pro" } else { "free" };
        admin.set_plan("t1", plan).await.unwrap();
        admin.set_plan("t2", plan).await.unwrap();
    }
    // 1 seeded + 2 tenants created + 104 moves.
    let d = Dashboard::for_engine(&engine, token());
    let rows = |page: &str| page.matches("<tr><td class=\"when\">").count();
    let first = text(&get(&d, "/audit", true).await).replace("<wbr>", "");
    assert_eq!(rows(&first), 100, "{first}");
    assert!(first.contains("operator:ana") && first.contains(">free</td><td>pro<"), "{first}");
    let next =
        first.split("rel=\"next\" href=\"/ops/audit?before=").nth(1).expect("a next page").split('"').next().unwrap();
    let second = text(&get(&d, &format!("/audit?before={next}"), true).await);
    assert_eq!(rows(&second), 7);
    assert!(second.contains("plan=free") && !second.contains("rel=\"next\""), "{second}");
    let t1 = text(&get(&d, "/audit?tenant=t1", true).await);
    assert_eq!(rows(&t1), 53);
    assert!(!t1.contains("t2"), "t1's alone");
    let page = text(&get(&d, "/tenants/t2", true).await);
    let changes = page.split("<h2>Changes</h2>").nth(1).unwrap().split("</section>").next().unwrap();
    assert_eq!(rows(changes), 10);
    assert!(changes.contains("href=\"/ops/audit?tenant=t2\""), "{changes}");
    for bad in ["/audit?before=x", "/audit?before=1.2.a%20b", "/audit?tenant=a%20b"] {
        let r = get(&d, bad, true).await;
        assert_eq!(r.status(), 200, "{bad}");
        assert_eq!(rows(&text(&r)), 100, "{bad}: the first page");
    }
}

#[tokio::test]
async fn figures_are_the_stores() {
    let (engine, _store) = seeded().await;
    let d = Dashboard::for_engine(&engine, token());
    let list = text(&get(&d, "/tenants", true).await);
    assert!(list.contains("credits 50 left of 50"), "the hostile tenant's balance: 50 granted, none used");
    let acme = text(&get(&d, "/tenants/acme", true).await);
    // Usage committed without a quota counter (the counters are the quota store's): its
    // gauge shows the counter, none here, and its charts the usage.
    assert!(acme.contains("optimum=\"0\" value=\"0\""), "no counter, nothing used on the gauge");
    let hourly = acme.split("class=\"chart hourly\"").nth(1).unwrap().split("</figure>").next().unwrap();
    assert!(hourly.contains("data-value=\"3\""), "its 3 requests of the last hour on its hourly chart");
    let billing = text(&get(&d, "/billing", true).await);
    assert!(billing.contains("Windows pending export (1)") && billing.contains("Dead letters (1)"));
    // Every row names its tenant by a link to its page, the id escaped in the text and the
    // address alike.
    let link = "<a class=\"tenant\" href=\"/ops/tenants/%3Ci%3Ex%3C%2Fi%3E%22%27\">&lt;i&gt;x&lt;/i&gt;&quot;&#39;</a>";
    let dead = billing.split("<table class=\"dead\">").nth(1).unwrap().split("</table>").next().unwrap();
    assert!(dead.contains(&format!("<td>{link}</td>")), "{dead}");
    let pending = billing.split("<table class=\"pending\">").nth(1).unwrap().split("</table>").next().unwrap();
    assert!(pending.contains("<td><a class=\"tenant\" href=\"/ops/tenants/acme\">acme</a></td>"), "{pending}");
    let alerts = text(&get(&d, "/alerts", true).await);
    assert!(alerts.contains(&format!("<td>{link}</td>")), "{alerts}");
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let (engine, _store) = seeded().await;
    let d = Dashboard::for_engine(&engine, token());
    assert_eq!(get(&d, "/tenants/nobody", true).await.status(), 404);
    assert_eq!(get(&d, "/tenants/%FF", true).await.status(), 404, "not UTF-8");
    assert_eq!(get(&d, "/tenants/", true).await.status(), 404);
    assert_eq!(get(&d, "/nothing", true).await.status(), 404);
    let huge = format!("/tenants?q={}", "y".repeat(50_000));
    let r = get(&d, &huge, true).await;
    assert_eq!(r.status(), 200);
    assert!(text(&r).contains(&format!("value=\"{}\"", "y".repeat(MAX_SEARCH_LEN))), "cut to the bound");
    assert!(!text(&r).contains(&"y".repeat(MAX_SEARCH_LEN + 1)));
    // A search cut inside a character is cut at the character.
    let r = get(&d, "/tenants?q=tg_live_abc%C3%A9%C3%A9", true).await;
    assert_eq!(r.headers()["location"], "/ops/tenants?q=tg_live_abc%C3%A9", "cut after the first é, not inside it");
    assert_eq!(get(&d, "/tenants?q=tg_live_abc%C3%A9", true).await.status(), 200);
    assert_eq!(Admin::for_engine(&engine).search_tenants("tg_live_abcéé", 5).await.unwrap().text, "tg_live_abcé");
    let long = format!("/tenants?q={}", "é".repeat(MAX_SEARCH_LEN + 5));
    assert_eq!(get(&d, &long, true).await.status(), 200);
    // A whole key pasted: its tenant's page (the key leaves the address bar), never echoed.
    let r = get(&d, "/tenants?q=tg_live_0123456789abcdefghijklmnopqrstuv", true).await;
    assert_eq!(
        (r.status().as_u16(), r.headers()["location"].to_str().unwrap()),
        (303, "/ops/tenants/%3Ci%3Ex%3C%2Fi%3E%22%27")
    );
    let r = get(&d, "/tenants?q=tg_live_0123456789abcdefghijklmnopqrstuX", true).await;
    assert_eq!((r.status().as_u16(), r.headers()["location"].to_str().unwrap()), (303, "/ops/tenants?q=tg_live_0123"));
    // Without an engine (`tollgate dashboard`), no node page.
    let offline = Dashboard::new(Admin::for_engine(&engine), token());
    assert_eq!(get(&offline, "/node", true).await.status(), 404);
    assert!(!text(&get(&offline, "/", true).await).contains("/ops/node"));
}

#[tokio::test]
async fn a_key_prefix_is_found_by_a_bounded_scan_and_a_whole_key_is_never_echoed() {
    let store = Arc::new(MemoryStore::new());
    let admin = Admin::new(store.clone());
    for i in 0..KEY_SCAN_TENANTS + 20 {
        store.put_tenant(&TenantRecord::new(format!("t{i:04}").into(), "free".into()), &[]).await.unwrap();
    }
    let hash = tollgate::store::KeyHash::of(b"k");
    store
        .put_key(
            &ApiKeyRecord::new(hash, "t0003".into(), 0).with_prefix("tg_live_AbCd"),
            tollgate::store::KeyWrite::Upsert,
        )
        .await
        .unwrap();
    let found = admin.search_tenants("tg_live_AbC", 25).await.unwrap();
    assert_eq!(found.found.iter().map(|(t, _)| t.id.as_str()).collect::<Vec<_>>(), ["t0003"]);
    let missing = admin.search_tenants("tg_live_Zz", 25).await.unwrap();
    assert!(missing.found.is_empty());
    assert_eq!((missing.scanned, missing.cut), (KEY_SCAN_TENANTS, true), "the scan stops at its bound");
    let whole = admin.search_tenants("tg_live_AbCdEFGHIJKLMNOPQRSTUVWXYZ012345", 25).await.unwrap();
    assert_eq!(whole.text, "tg_live_AbCd", "a whole key is cut to a prefix");
    assert_eq!(whole.found.len(), 1);
    let by_id = admin.search_tenants("t001", 25).await.unwrap();
    assert_eq!(by_id.found.len(), 10, "t0010 to t0019 by id prefix");
    assert_eq!(by_id.scanned, 0, "no key scan for text that is not a key");
}

#[tokio::test]
async fn a_configuration_without_a_token_needs_an_explicit_open() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "short\n").unwrap();
    let text = format!("[plans.free]\nrate = \"1/s\"\n[dashboard]\ntoken_file = \"{}\"\n", file.display());
    let err = Config::from_toml_str(&text).unwrap_err();
    assert_eq!(err.key(), "dashboard.token_file");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let config = Config::from_toml_str(&text).unwrap();
    assert!(matches!(Access::from_config(&config), Ok(Access::Configured)), "it follows reloads");
    let bare = Config::from_toml_str("[plans.free]\nrate = \"1/s\"\n").unwrap();
    assert!(Access::from_config(&bare).is_err());
}

#[tokio::test]
async fn tenants_declared_in_the_file_are_shown_without_their_keys() {
    let mut text = String::from(
        "[store]\nkind = \"memory\"\n[plans.free]\nrate = \"2/s\"\n[tenants.filed]\nplan = \"free\"\n\
         keys = [\"tg_live_filed_secret_key_0123\"]\nstripe_customer = \"cus_filed\"\n",
    );
    text.push_str("[tenants.other]\nplan = \"free\"\n");
    let config = Config::from_toml_str(&text).unwrap();
    let (engine, _worker) = Tollgate::builder(config).build();
    let d = Dashboard::for_engine(&engine, token());
    let list = text_of(&get(&d, "/tenants", true).await);
    assert!(list.contains("href=\"/ops/tenants/filed\"") && list.contains("href=\"/ops/tenants/other\""));
    let found = text_of(&get(&d, "/tenants?q=cus_filed", true).await);
    assert!(found.contains("href=\"/ops/tenants/filed\"") && !found.contains("/tenants/other"));
    let page = get(&d, "/tenants/filed", true).await;
    assert_eq!(page.status(), 200);
    let page = text_of(&page);
    assert!(page.contains("cus_filed"));
    assert!(!page.contains("secret_key") && !list.contains("secret_key"), "a key of the file is never shown");
}

fn text_of(r: &http::Response<Bytes>) -> String {
    text(r)
}

#[tokio::test]
async fn a_loopback_dashboard_answers_loopback_host_names_only() {
    let (engine, _store) = seeded().await;
    let d = Dashboard::new(Admin::for_engine(&engine), Access::Loopback);
    let with_host = |host: &'static str| http::Request::get("/").header("host", host).body(Bytes::new()).unwrap();
    assert_eq!(d.respond("", with_host("127.0.0.1:9090")).await.status(), 200, "no token on loopback");
    assert_eq!(d.respond("", with_host("localhost:9090")).await.status(), 200);
    // A page whose name was pointed at 127.0.0.1 (DNS rebinding) reads nothing.
    let rebound = d.respond("", with_host("attacker.example:9090")).await;
    assert_eq!(rebound.status(), 421);
}

#[tokio::test]
async fn a_base_a_client_could_have_chosen_is_refused() {
    let (engine, _store) = seeded().await;
    let d = Dashboard::for_engine(&engine, token());
    let req = || http::Request::get("/").header("authorization", format!("Bearer {TOKEN}")).body(Bytes::new()).unwrap();
    for base in ["/\\evil.example/ops", "//evil.example", "/ops;Domain=evil", "/ops\"x", "ops"] {
        assert_eq!(d.respond(base, req()).await.status(), 404, "{base}");
    }
    assert_eq!(d.respond("/admin/ops%20x", req()).await.status(), 200);
    assert_eq!(d.respond("", req()).await.status(), 200);
}

/// A tenant on a ladder's plan (`[tiers.NAME]`) has its tier on its page: what it has paid and
/// what unlocks the next plan, as its usage route and `tollgate usage` say.
#[tokio::test]
async fn a_tenants_tier_is_on_its_page() {
    let config = Config::from_toml_str(
        "[store]\nkind = \"memory\"\n[billing]\ncurrency = \"usd\"\n[plans.free]\n[plans.tier1]\n[tiers.api]\n\
         order = [\"free\", \"tier1\"]\ntier1 = { paid = \"5.00\" }\n",
    )
    .unwrap();
    let store = Arc::new(MemoryStore::new());
    let (engine, _worker) = Tollgate::builder(config).store_arc(store.clone()).build();
    store.put_tenant(&TenantRecord::new("acme".into(), "free".into()), &[]).await.unwrap();
    let now = engine.clock().unix_secs();
    let paid = tollgate::store::PaymentCall::Record {
        tenant: "acme".into(),
        payment: "pi_1".into(),
        amount: 200,
        currency: "usd".into(),
        billing: "usd".into(),
        at: now,
    };
    tollgate::store::QuotaStore::payments(&*store, &paid, now).await.unwrap();
    let d = Dashboard::for_engine(&engine, token());
    let page = text(&get(&d, "/tenants/acme", true).await);
    let tier = page.split("<p class=\"tier\">").nth(1).expect("a tier section").split("</p>").next().unwrap();
    assert!(tier.starts_with("api: paid 2.00 usd since ") && tier.ends_with("; next tier1: 3.00 usd to pay"), "{tier}");
}

/// The plans page counts the directory's tenants on each version of each plan, says which is
/// current and which the file no longer declares, and shows a plan name from the store as text.
#[tokio::test]
async fn the_plans_page_counts_tenants_per_version() {
    let config = Config::from_toml_str(
        "[store]\nkind = \"memory\"\n[plans.free]\n[plans.pro]\nversion = 3\nrate = \"30/s\"\n\
         [plans.pro.versions.1]\nrate = \"10/s\"\n",
    )
    .unwrap();
    let store = Arc::new(MemoryStore::new());
    let (engine, _worker) = Tollgate::builder(config).store_arc(store.clone()).build();
    for (tenant, plan) in [("a", "pro"), ("b", "pro"), ("c", "pro@2"), ("d", "pro@3"), ("e", MARK)] {
        store.put_tenant(&TenantRecord::new(tenant.into(), plan.into()), &[]).await.unwrap();
    }
    let d = Dashboard::for_engine(&engine, token());
    let page = text(&get(&d, "/plans", true).await);
    let rows: Vec<&str> = page.split("<tr>").skip(2).map(|r| r.split("</tr>").next().unwrap()).collect();
    assert_eq!(
        rows,
        [
            "<td>&lt;i&gt;x&lt;/i&gt;&quot;&#39;</td><td>1</td><td>1</td><td>not in the configuration</td>",
            "<td>free</td><td>1</td><td>0</td><td>current</td>",
            "<td>pro</td><td>1</td><td>2</td><td>earlier version</td>",
            "<td>pro</td><td>2</td><td>1</td><td>not declared: served the current version</td>",
            "<td>pro</td><td>3</td><td>1</td><td>current</td>",
        ],
        "{page}"
    );
    assert!(!page.contains("<i>"));
}

fn config_with_token(dir: &std::path::Path, token: Option<&str>) -> Config {
    let mut text = String::from("[store]\nkind = \"memory\"\n[plans.free]\nrate = \"2/s\"\n");
    if let Some(token) = token {
        let file = dir.join(format!("token-{}", &token[..4]));
        std::fs::write(&file, format!("{token}\n")).unwrap();
        text.push_str(&format!("[dashboard]\ntoken_file = \"{}\"\n", file.display()));
    }
    Config::from_toml_str(&text).unwrap()
}

fn bearer(token: &str) -> http::Request<Bytes> {
    http::Request::get("/").header("authorization", format!("Bearer {token}")).body(Bytes::new()).unwrap()
}

fn with_cookie(cookie: &str) -> http::Request<Bytes> {
    http::Request::get("/").header("cookie", cookie).body(Bytes::new()).unwrap()
}

fn login_as(token: &str, from: Option<std::net::IpAddr>, proxy_says_tls: bool) -> http::Request<Bytes> {
    let mut r = http::Request::post("/login")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Bytes::from(format!("token={token}")))
        .unwrap();
    if proxy_says_tls {
        r.headers_mut().insert("x-forwarded-proto", "https".parse().unwrap());
    }
    r.extensions_mut().insert(tollgate::dashboard::Client::new(from, false));
    r
}

/// The `name=value` of a login's `Set-Cookie`.
fn session_of(r: &http::Response<Bytes>) -> String {
    assert_eq!(r.status(), 303, "{}", text(r));
    r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned()
}

/// A dashboard mounted with `Access::from_config` follows the engine's reloads: a new token
/// takes effect at the next request and ends the old one's sessions; a reload that names no
/// token shuts everyone out (it never opens the dashboard).
#[tokio::test]
async fn a_reloaded_token_takes_effect_at_the_next_request() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = ("0ld-token-5f0c1a9e3b7d24c8a6e0f19b", "n3w-token-9b3d7c5a2e6f0c1a9e3b7d24");
    let config = config_with_token(dir.path(), Some(old));
    let (engine, _worker) = Tollgate::builder(config.clone()).build();
    let d = Dashboard::for_engine(&engine, Access::from_config(&config).unwrap());
    assert_eq!(d.respond("/ops", bearer(old)).await.status(), 200);
    let session = session_of(&d.respond("/ops", login_as(old, None, false)).await);
    assert_eq!(d.respond("/ops", with_cookie(&session)).await.status(), 200);

    engine.reload(config_with_token(dir.path(), Some(new))).await.unwrap();
    assert_eq!(d.respond("/ops", bearer(old)).await.status(), 401, "the old token is refused");
    assert_eq!(d.respond("/ops", with_cookie(&session)).await.status(), 401, "its sessions end");
    assert_eq!(d.respond("/ops", bearer(new)).await.status(), 200);

    engine.reload(config_with_token(dir.path(), None)).await.unwrap();
    assert_eq!(d.respond("/ops", bearer(new)).await.status(), 401, "no token: nobody, never open");
    assert_eq!(d.respond("/ops", http::Request::get("/").body(Bytes::new()).unwrap()).await.status(), 401);
}

/// Over TLS (a proxy saying so), the session cookie is `Secure` under the `__Host-` prefix
/// (`Path=/`); over plain HTTP it keeps the dashboard's path. Sign-out ends the session on the
/// node (its cookie no longer opens a page), tells the browser to forget both cookies, and
/// leaves other sessions open.
#[tokio::test]
async fn the_cookie_is_secure_over_tls_and_signing_out_ends_the_session() {
    let (clock, time) = tollgate::clock::Clock::fake_at_unix(1_800_000_000);
    let (engine, _worker) = Tollgate::builder(config()).clock(clock).build();
    let d = Dashboard::for_engine(&engine, token());
    let over_tls = d.respond("/ops", login_as(TOKEN, None, true)).await;
    let set = over_tls.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set.starts_with("__Host-tollgate_dashboard="), "{set}");
    for part in ["; Path=/;", "; Secure;", "; HttpOnly;", "SameSite=Strict"] {
        assert!(set.contains(part), "{set} lacks {part}");
    }
    let plain = d.respond("/ops", login_as(TOKEN, None, false)).await;
    let set = plain.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set.starts_with("tollgate_dashboard=") && set.contains("Path=/ops;") && !set.contains("Secure"), "{set}");

    let first = session_of(&over_tls);
    let page = d.respond("/ops", with_cookie(&first)).await;
    assert_eq!(page.status(), 200);
    assert!(text(&page).contains("action=\"/ops/logout\""), "a signed-in page has the sign-out button");
    assert!(!text(&get(&d, "/", true).await).contains("/logout"), "a bearer has no session to end");
    time.advance(std::time::Duration::from_secs(5));
    let second = session_of(&d.respond("/ops", login_as(TOKEN, None, false)).await);

    let signout = |cookie: &str| http::Request::post("/logout").header("cookie", cookie).body(Bytes::new()).unwrap();
    let r = d.respond("/ops", signout(&first)).await;
    assert_eq!((r.status().as_u16(), r.headers()["location"].to_str().unwrap()), (303, "/ops/login"));
    let cleared: Vec<_> = r.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_owned()).collect();
    assert!(cleared.iter().any(|c| c.starts_with("__Host-tollgate_dashboard=;") && c.contains("Max-Age=0")));
    assert!(cleared.iter().any(|c| c.starts_with("tollgate_dashboard=;") && c.contains("Max-Age=0")));
    assert_eq!(d.respond("/ops", with_cookie(&first)).await.status(), 401, "the session ended on the node");
    assert_eq!(d.respond("/ops", with_cookie(&second)).await.status(), 200, "another session holds");
    assert_eq!(d.respond("/ops", http::Request::get("/logout").body(Bytes::new()).unwrap()).await.status(), 405);
    time.advance(std::time::Duration::from_secs(u64::try_from(tollgate::dashboard::SESSION_SECS).unwrap()));
    assert_eq!(d.respond("/ops", with_cookie(&second)).await.status(), 401, "sessions end by the clock");
}

/// Wrong tokens are limited per client address: past `MAX_FAILED_TRIES` in a window, the
/// address is answered 429 with `Retry-After`, the right token included (it is not compared);
/// another address and an open session are served; the window ends by the clock.
#[tokio::test]
async fn wrong_tokens_are_limited_per_address() {
    use tollgate::dashboard::{Client, MAX_FAILED_TRIES, TRY_WINDOW_SECS};
    let (clock, time) = tollgate::clock::Clock::fake_at_unix(1_800_000_000);
    let (engine, _worker) = Tollgate::builder(config()).clock(clock).build();
    let d = Dashboard::for_engine(&engine, token());
    let attacker: std::net::IpAddr = "203.0.113.9".parse().unwrap();
    let from = |ip: std::net::IpAddr, mut r: http::Request<Bytes>| {
        r.extensions_mut().insert(Client::new(Some(ip), false));
        r
    };
    let open = session_of(&d.respond("/ops", login_as(TOKEN, Some(attacker), false)).await);
    for i in 0..MAX_FAILED_TRIES {
        let wrong = format!("wrong-token-{i:04}-5f0c1a9e3b7d24c8a6e0");
        let r = match i % 2 {
            0 => d.respond("/ops", from(attacker, bearer(&wrong))).await,
            _ => d.respond("/ops", login_as(&wrong, Some(attacker), false)).await,
        };
        assert_eq!(r.status(), 401, "try {i}");
    }
    let barred = d.respond("/ops", from(attacker, bearer(TOKEN))).await;
    assert_eq!(barred.status(), 429, "the right token is not even compared");
    assert_eq!(barred.headers()["retry-after"], TRY_WINDOW_SECS.to_string().as_str());
    assert_eq!(d.respond("/ops", login_as(TOKEN, Some(attacker), false)).await.status(), 429);
    assert_eq!(d.respond("/ops", from(attacker, with_cookie(&open))).await.status(), 200, "an open session");
    let mut other = None;
    for last in 1..=50u8 {
        let ip = std::net::IpAddr::from([198, 51, 100, last]);
        if d.respond("/ops", from(ip, bearer(TOKEN))).await.status() == 200 {
            other = Some(ip);
            break;
        }
    }
    assert!(other.is_some(), "other addresses are served");
    time.advance(std::time::Duration::from_secs(u64::try_from(TRY_WINDOW_SECS).unwrap()));
    assert_eq!(d.respond("/ops", from(attacker, bearer(TOKEN))).await.status(), 200, "the window ended");
}

/// The tenants list pages through the directory and the tenants only the file declares in one
/// id order: each tenant once, at most a page of 25 a load, however many the file declares (a
/// load looks up at most 25 of the file's tenants in the directory, never all of them).
#[tokio::test]
async fn the_files_tenants_page_with_the_directorys_in_id_order() {
    let mut file = String::from("[store]\nkind = \"memory\"\n[plans.free]\nrate = \"2/s\"\n");
    for i in 0..60 {
        file.push_str(&format!("[tenants.f{i:03}]\nplan = \"free\"\n"));
    }
    let store = Arc::new(MemoryStore::new());
    let (engine, _worker) = Tollgate::builder(Config::from_toml_str(&file).unwrap()).store_arc(store.clone()).build();
    let mut expected: Vec<String> = (0..60).map(|i| format!("f{i:03}")).collect();
    for id in (0..30).map(|i| format!("d{i:03}")).chain(["f010".to_owned(), "f0105".to_owned()]) {
        store.put_tenant(&TenantRecord::new(id.as_str().into(), "free".into()), &[]).await.unwrap();
        if !expected.contains(&id) {
            expected.push(id);
        }
    }
    expected.sort();
    let d = Dashboard::for_engine(&engine, token());
    let (mut seen, mut after, mut loads) = (Vec::new(), None::<String>, 0);
    loop {
        loads += 1;
        assert!(loads < 10, "the pages end");
        let path = after.as_ref().map_or_else(|| "/tenants".to_owned(), |a| format!("/tenants?after={a}"));
        let page = text(&get(&d, &path, true).await);
        let rows: Vec<String> = page
            .split("<a class=\"tenant\" href=\"/ops/tenants/")
            .skip(1)
            .map(|r| r.split('"').next().unwrap().to_owned())
            .collect();
        assert!(rows.len() <= 25, "{} rows on one page", rows.len());
        assert!(rows.windows(2).all(|w| w[0] < w[1]), "in id order: {rows:?}");
        seen.extend(rows);
        after = page
            .split("rel=\"next\" href=\"/ops/tenants?after=")
            .nth(1)
            .map(|r| r.split('"').next().unwrap().to_owned());
        if after.is_none() {
            break;
        }
    }
    assert_eq!(seen, expected, "every tenant once, in id order");
}

/// A tenant's credit grants: at most 100 on its page, open ones first, and the page says how
/// many there are.
#[tokio::test]
async fn a_tenants_grants_are_shown_a_hundred_at_most() {
    let (engine, store) = seeded().await;
    let now = engine.clock().unix_secs();
    store.put_tenant(&TenantRecord::new("many".into(), "pro".into()), &[]).await.unwrap();
    for i in 0..130 {
        let grant = CreditGrant::new("many".into(), "credits".into(), format!("g{i:03}"), 10, now);
        store.grant_credits(&grant).await.unwrap();
    }
    let d = Dashboard::for_engine(&engine, token());
    let page = get(&d, "/tenants/many", true).await;
    assert_eq!(page.status(), 200);
    let page = text(&page);
    let table = page.split("<table class=\"grants\">").nth(1).unwrap().split("</table>").next().unwrap();
    assert_eq!(table.matches("<tr><td>").count(), 100, "100 rows");
    assert!(page.contains("the first 100 of 130 grants, open ones first"), "the cut is said");
}

/// A whole key, posted from the search box, opens its tenant's page: found by its hash in one
/// read, whichever system made it (issued, or imported with its own shape), and never in an
/// address. A key of nobody is searched by its prefix; other text is searched as typed.
#[tokio::test]
async fn a_whole_key_posted_opens_its_tenants_page() {
    let (engine, _store) = seeded().await;
    let admin = Admin::for_engine(&engine);
    let issued = admin.issue_key("acme", tollgate::admin::KeyOptions::default()).await.unwrap().key;
    admin.import_csv("tenant,plan,key\nglobex,free,sk_live_51Hx0ther0system0key0000000\n").await.unwrap();
    let d = Dashboard::for_engine(&engine, token());
    let post = |q: &str| {
        http::Request::post("/search")
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Bytes::from(form_urlencoded::Serializer::new(String::new()).append_pair("q", q).finish()))
            .unwrap()
    };
    let location =
        |r: &http::Response<Bytes>| (r.status().as_u16(), r.headers()["location"].to_str().unwrap().to_owned());
    assert_eq!(location(&d.respond("/ops", post(&issued)).await), (303, "/ops/tenants/acme".to_owned()));
    assert_eq!(
        location(&d.respond("/ops", post(" sk_live_51Hx0ther0system0key0000000\n")).await),
        (303, "/ops/tenants/globex".to_owned()),
        "an imported key of another shape"
    );
    let nobody = "tg_live_Nobody0wnsThisKey0000000000";
    assert_eq!(location(&d.respond("/ops", post(nobody)).await), (303, "/ops/tenants?q=tg_live_Nobo".to_owned()));
    assert_eq!(location(&d.respond("/ops", post("acm")).await), (303, "/ops/tenants?q=acm".to_owned()));
    // In the address too, a whole key opens its tenant and leaves the address bar.
    let r = get(&d, &format!("/tenants?q={issued}"), true).await;
    assert_eq!(location(&r), (303, "/ops/tenants/acme".to_owned()));
    // The form posts; the search takes no other method, and needs the token.
    let page = text(&get(&d, "/tenants", true).await);
    assert!(page.contains("method=\"post\" action=\"/ops/search\""), "the form posts");
    assert_eq!(get(&d, "/search", true).await.status(), 405);
    let mut anonymous = post(&issued);
    anonymous.headers_mut().remove("authorization");
    assert_eq!(d.respond("/ops", anonymous).await.status(), 401, "nothing found without the token");
}

/// A key prefix matching more tenants than a page pages on, and so does a scan stopped at its
/// bound: every tenant holding a matching key is reached, each once. An imported key of
/// tollgate's shape keeps the prefix an issued key keeps, so its prefix finds it.
#[tokio::test]
async fn a_key_prefix_search_pages_through_every_match() {
    let store = Arc::new(MemoryStore::new());
    let admin = Admin::new(store.clone());
    let mut expected = Vec::new();
    for i in 0..KEY_SCAN_TENANTS + 260 {
        let id = format!("t{i:04}");
        store.put_tenant(&TenantRecord::new(id.as_str().into(), "free".into()), &[]).await.unwrap();
        if i % 20 == 0 || i > KEY_SCAN_TENANTS + 200 {
            let hash = tollgate::store::KeyHash::of(id.as_bytes());
            let key = ApiKeyRecord::new(hash, id.as_str().into(), 0).with_prefix("tg_live_Same");
            store.put_key(&key, tollgate::store::KeyWrite::Upsert).await.unwrap();
            expected.push(id);
        }
    }
    let (mut seen, mut after, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        pages += 1;
        assert!(pages < 20, "the pages end");
        let page = admin.search_tenants_after("tg_live_Sam", after.as_deref(), 25).await.unwrap();
        assert!(page.found.len() <= 25 && page.scanned <= KEY_SCAN_TENANTS);
        seen.extend(page.found.iter().map(|(t, _)| t.id.as_str().to_owned()));
        match page.next {
            Some(next) => after = Some(next.as_str().to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, expected, "every match once, in id order");
    // On the dashboard: the next page's link keeps the search.
    let (engine, _worker) = Tollgate::builder(config()).store_arc(store.clone()).build();
    let d = Dashboard::for_engine(&engine, token());
    let page = text(&get(&d, "/tenants?q=tg_live_Sam", true).await);
    assert!(page.contains("rel=\"next\" href=\"/ops/tenants?q=tg_live_Sam&amp;after=t0480\""), "{page}");
    // An imported key of tollgate's shape: found by its issued-length prefix.
    let imported = "tg_live_Imp0rtedKey0123456789abcdefgh";
    Admin::new(store.clone()).import_csv(&format!("tenant,plan,key\nzz-imported,free,{imported}\n")).await.unwrap();
    let found = Admin::new(store.clone()).search_tenants_after("tg_live_Imp0", Some("t0600"), 25).await.unwrap();
    assert_eq!(found.found.iter().map(|(t, _)| t.id.as_str()).collect::<Vec<_>>(), ["zz-imported"]);
}

/// Money is shown as money: a spend cap's gauge reads "1.50 USD of 10.00 USD", not nano-units,
/// and spend is not charted as a series of units.
#[tokio::test]
async fn a_spend_caps_gauge_is_shown_in_the_currency() {
    let toml = "[store]\nkind = \"memory\"\n[billing]\ncurrency = \"usd\"\n[meters.requests]\nprice = \"0.25\"\n\
                [plans.p]\nrate = \"1000/s\"\nspend = { limit = \"10.00\", period = \"month\", mode = \"hard\" }\n";
    let store: Arc<dyn tollgate::store::Store> = Arc::new(MemoryStore::new());
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(1_800_000_000);
    let h = crate::common::Harness::build(toml, store.clone(), clock, handle);
    let admin = Admin::for_engine(&h.tollgate);
    drop(store);
    admin.add_tenant("acme", "p", None).await.unwrap();
    let key = admin.issue_key("acme", Default::default()).await.unwrap().key;
    for _ in 0..6 {
        assert_eq!(h.status("/", &key).await, 200);
    }
    // The node gives back what it leased and keeps unspent: the store holds what was spent.
    h.tollgate.shutdown().await.unwrap();
    let d = Dashboard::for_engine(&h.tollgate, token());
    let page = text(&get(&d, "/tenants/acme", true).await);
    let gauge =
        page.split("<div class=\"meter-spend\">").nth(1).expect("a spend gauge").split("</div>").next().unwrap();
    assert!(gauge.contains("<span class=\"value\">1.50 USD</span>"), "{gauge}");
    assert!(gauge.contains("<span class=\"max\">10.00 USD</span>"), "{gauge}");
    assert!(!page.contains("1,500,000,000") && !page.contains("10,000,000,000"), "no nano-units");
    let now = h.tollgate.clock().unix_secs();
    let spent = admin.usage("acme", Some("spend"), now - 3600, now + 1).await.unwrap();
    assert!(!spent.is_empty(), "the usage store holds spend rows");
    assert!(page.contains("class=\"chart hourly\"><figcaption>requests"), "requests are charted");
    assert!(!page.contains("class=\"chart hourly\"><figcaption>spend"), "spend is not charted as units");
}

/// Every page says when its figures were read ("as of", by the engine's clock), and reloads
/// itself every 10 seconds when asked (`?refresh=on`), by a `<meta>` refresh: no script.
#[tokio::test]
async fn pages_say_when_they_were_read_and_refresh_when_asked() {
    let (clock, time) = tollgate::clock::Clock::fake_at_unix(1_800_000_000);
    let (engine, _worker) = Tollgate::builder(config()).clock(clock).build();
    let d = Dashboard::for_engine(&engine, token());
    for path in ["/", "/plans", "/billing", "/alerts", "/node"] {
        let page = text(&get(&d, path, true).await);
        assert!(page.contains("<span class=\"asof\">as of 2027-01-15 08:00:00 UTC</span>"), "{path}: {page}");
        assert!(!page.contains("http-equiv=\"refresh\""), "{path}: no refresh unless asked");
        assert!(page.contains("href=\"?refresh=on\""), "{path}");
        let refreshed = text(&get(&d, &format!("{path}?refresh=on"), true).await);
        assert!(refreshed.contains("<meta http-equiv=\"refresh\" content=\"10\">"), "{path}");
        assert!(refreshed.contains("stop refreshing") && !refreshed.contains("<script"), "{path}");
    }
    time.advance(std::time::Duration::from_secs(75));
    assert!(text(&get(&d, "/", true).await).contains("as of 2027-01-15 08:01:15 UTC"), "read again, told again");
}

/// Found by review: a page of another site could post to the dashboard from the operator's
/// browser (wrong tokens to bar the operator's own address, a sign-out). A form post a browser
/// marks cross-site (`Sec-Fetch-Site`, or an `Origin` not the dashboard's host) is refused
/// with 403 and changes nothing: it is not counted as a wrong token. Same-origin posts, and
/// clients that send neither header (curl), are served.
#[tokio::test]
async fn a_form_posted_from_another_site_is_refused_and_counted_for_nothing() {
    use tollgate::dashboard::{Client, MAX_FAILED_TRIES};
    let (engine, _worker) = Tollgate::builder(config()).build();
    let d = Dashboard::for_engine(&engine, token());
    let operator: std::net::IpAddr = "192.0.2.7".parse().unwrap();
    let cross = |mut r: http::Request<Bytes>, how: (&'static str, &'static str)| {
        r.headers_mut().insert(how.0, how.1.parse().unwrap());
        r.headers_mut().insert("host", "ops.example.com".parse().unwrap());
        r.extensions_mut().insert(Client::new(Some(operator), false));
        r
    };
    for how in [("sec-fetch-site", "cross-site"), ("sec-fetch-site", "same-site"), ("origin", "https://evil.example")] {
        for i in 0..=MAX_FAILED_TRIES {
            let wrong = format!("wrong-token-{i:04}-5f0c1a9e3b7d24c8a6e0");
            let r = d.respond("/ops", cross(login_as(&wrong, Some(operator), false), how)).await;
            assert_eq!(r.status(), 403, "{how:?}, try {i}");
        }
        let search = http::Request::post("/search")
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Bytes::from_static(b"q=acme"))
            .unwrap();
        assert_eq!(d.respond("/ops", cross(search, how)).await.status(), 403, "{how:?}");
        let signout = http::Request::post("/logout").body(Bytes::new()).unwrap();
        let r = d.respond("/ops", cross(signout, how)).await;
        assert_eq!(r.status(), 403, "{how:?}");
        assert!(r.headers().get("set-cookie").is_none(), "no cookie cleared");
    }
    // None of them counted: the operator still signs in, from its own origin or from curl.
    let same = cross(login_as(TOKEN, Some(operator), false), ("origin", "https://ops.example.com"));
    assert_eq!(d.respond("/ops", same).await.status(), 303, "same origin");
    let same = cross(login_as(TOKEN, Some(operator), false), ("sec-fetch-site", "same-origin"));
    assert_eq!(d.respond("/ops", same).await.status(), 303, "same origin, by the browser's word");
    assert_eq!(d.respond("/ops", login_as(TOKEN, Some(operator), false)).await.status(), 303, "no header: curl");
}

/// Found by review: a token rotated away and back (a reload rolled back: A, then B, then A)
/// brought back every session of A issued before the rotation, signed out or not. Sessions
/// issued before the token in force last changed end.
#[tokio::test]
async fn a_token_rotated_away_and_back_does_not_bring_back_its_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = ("a-token-5f0c1a9e3b7d24c8a6e0f19b2", "b-token-9b3d7c5a2e6f0c1a9e3b7d242");
    let (clock, time) = tollgate::clock::Clock::fake_at_unix(1_800_000_000);
    let config = config_with_token(dir.path(), Some(a));
    let (engine, _worker) = Tollgate::builder(config.clone()).clock(clock).build();
    let d = Dashboard::for_engine(&engine, Access::from_config(&config).unwrap());
    let session = session_of(&d.respond("/ops", login_as(a, None, false)).await);
    assert_eq!(d.respond("/ops", with_cookie(&session)).await.status(), 200);
    time.advance(std::time::Duration::from_secs(5));
    engine.reload(config_with_token(dir.path(), Some(b))).await.unwrap();
    assert_eq!(d.respond("/ops", with_cookie(&session)).await.status(), 401);
    time.advance(std::time::Duration::from_secs(5));
    engine.reload(config_with_token(dir.path(), Some(a))).await.unwrap();
    assert_eq!(d.respond("/ops", with_cookie(&session)).await.status(), 401, "A's old session stays ended");
    let again = session_of(&d.respond("/ops", login_as(a, None, false)).await);
    assert_eq!(d.respond("/ops", with_cookie(&again)).await.status(), 200, "a new session of A");
}

/// Found by review: a browser holding both cookies (one over TLS, one over plain HTTP) signed
/// out only the first; every session the request shows ends.
#[tokio::test]
async fn signing_out_ends_every_session_the_request_shows() {
    let (clock, time) = tollgate::clock::Clock::fake_at_unix(1_800_000_000);
    let (engine, _worker) = Tollgate::builder(config()).clock(clock).build();
    let d = Dashboard::for_engine(&engine, token());
    let tls = session_of(&d.respond("/ops", login_as(TOKEN, None, true)).await);
    time.advance(std::time::Duration::from_secs(2));
    let plain = session_of(&d.respond("/ops", login_as(TOKEN, None, false)).await);
    let both = format!("{tls}; {plain}");
    let signout = http::Request::post("/logout").header("cookie", &both).body(Bytes::new()).unwrap();
    assert_eq!(d.respond("/ops", signout).await.status(), 303);
    assert_eq!(d.respond("/ops", with_cookie(&tls)).await.status(), 401);
    assert_eq!(d.respond("/ops", with_cookie(&plain)).await.status(), 401);
}

/// Found by review: a whole key inside the text searched (`key: tg_live_…`, upper case) was
/// redirected to an address holding it whole; it is cut to a key's prefix wherever it is.
#[tokio::test]
async fn a_whole_key_inside_the_text_searched_never_reaches_the_address() {
    let (engine, _store) = seeded().await;
    let d = Dashboard::for_engine(&engine, token());
    for typed in ["key: tg_live_Nobody0wnsThisKey0000000000", "TG_LIVE_Nobody0wnsThisKey0000000000"] {
        let post = http::Request::post("/search")
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Bytes::from(form_urlencoded::Serializer::new(String::new()).append_pair("q", typed).finish()))
            .unwrap();
        let r = d.respond("/ops", post).await;
        let location = r.headers()["location"].to_str().unwrap().to_owned();
        assert!(!location.contains("0wnsThisKey"), "{typed}: {location}");
    }
    assert_eq!(tollgate::admin::search_text("key: tg_live_Nobody0wnsThisKey0000000000"), "key: tg_live_Nobo");
    // In the address, a key late in a long text (past the search's 128 characters) leaves the
    // address bar too: the text is read whole before it is cut.
    let late = format!("{}tg_live_Nobody0wnsThisKey0000000000", "a".repeat(121));
    let r = get(&d, &format!("/tenants?q={late}"), true).await;
    assert_eq!(r.status(), 303);
    assert!(!r.headers()["location"].to_str().unwrap().contains("0wnsThisKey"));
}

/// The tenants' ids in the order a list page shows them.
fn listed(page: &str) -> Vec<String> {
    page.split("<a class=\"tenant\" href=\"/ops/tenants/")
        .skip(1)
        .map(|r| r.split('"').next().unwrap().to_owned())
        .collect()
}

/// The list narrowed to a plan or a state and ordered by balance left, among a window of at
/// most 200 tenants read (the file's among them), the next window a link away with the same
/// view; a value the list does not know is no filter, and one from the address is escaped.
#[tokio::test]
async fn the_list_is_filtered_and_sorted_among_a_bounded_window_of_tenants() {
    let file = "[store]\nkind = \"memory\"\n[meters.requests]\n[meters.credits]\n\
                [plans.free]\nrate = \"2/s\"\nquotas.requests = { limit = 100, period = \"day\", mode = \"hard\" }\n\
                [plans.pro]\nrate = \"50/s\"\nquotas.credits = { period = \"prepaid\" }\n\
                [[routes]]\nmethod = \"POST\"\npath = \"/v1/generate\"\nmeter = \"credits\"\n\
                [tenants.t0995]\nplan = \"pro\"\n";
    let store = Arc::new(MemoryStore::new());
    let (engine, _worker) = Tollgate::builder(Config::from_toml_str(file).unwrap()).store_arc(store.clone()).build();
    let now = engine.clock().unix_secs();
    for i in 0..250u64 {
        let id = format!("t{i:03}");
        let plan = if i % 5 == 0 { "pro" } else { "free" };
        store.put_tenant(&TenantRecord::new(id.as_str().into(), plan.into()), &[]).await.unwrap();
        if i % 10 == 0 {
            store
                .grant_credits(&CreditGrant::new(id.as_str().into(), "credits".into(), "g", 1000 - i, now))
                .await
                .unwrap();
        }
    }
    let d = Dashboard::for_engine(&engine, token());

    let page = text(&get(&d, "/tenants?plan=pro", true).await);
    let rows = listed(&page);
    let mut pro: Vec<String> = (0..200).filter(|i| i % 5 == 0).map(|i| format!("t{i:03}")).collect();
    pro.push("t0995".to_owned());
    pro.sort();
    assert_eq!(rows, pro, "the pro tenants among the 200 read (199 of the directory, the file's one), in id order");
    assert!(page.contains("41 of the 200 tenants read match"), "{page}");
    assert!(page.contains("<option value=\"pro\" selected>pro</option>"), "{page}");
    let next = "rel=\"next\" href=\"/ops/tenants?plan=pro&amp;after=t198\"";
    assert!(page.contains(next), "the next window keeps the view: {page}");
    let rest = listed(&text(&get(&d, "/tenants?plan=pro&after=t198", true).await));
    assert_eq!(rest, (200..250).filter(|i| i % 5 == 0).map(|i| format!("t{i:03}")).collect::<Vec<_>>());

    let page = text(&get(&d, "/tenants?plan=pro&sort=balance", true).await);
    let mut empty: Vec<String> = (0..199).filter(|i| i % 10 == 5).map(|i| format!("t{i:03}")).collect();
    empty.push("t0995".to_owned());
    empty.sort();
    let mut want = empty.clone();
    want.extend((0..200).filter(|i| i % 10 == 0).rev().map(|i| format!("t{i:03}")));
    assert_eq!(listed(&page), want, "a balance never granted (0 left) first, then the least left (t190 has 810)");
    assert!(page.contains("credits 0 left of 0"), "{page}");
    assert!(page.contains("<th aria-sort=\"ascending\"><a href=\"/ops/tenants?plan=pro&amp;sort=balance\">"), "{page}");
    // Without a plan that has a balance, last: the free tenants after every pro one.
    let all = listed(&text(&get(&d, "/tenants?sort=balance", true).await));
    assert_eq!(all.len(), 200);
    assert!(all[..41].iter().all(|t| pro.contains(t)) && all[41..].iter().all(|t| !pro.contains(t)), "{all:?}");

    let page = text(&get(&d, "/tenants?state=balance+empty", true).await);
    assert_eq!(listed(&page), empty, "pro tenants without a grant have an empty balance");
    assert!(page.contains("21 of the 200 tenants read match"), "{page}");

    // Unknown values narrow nothing: the plain page of 25, by id.
    let page = text(&get(&d, "/tenants?sort=nope&state=zzz&plan=", true).await);
    assert!(!page.contains("class=\"window\""), "{page}");
    assert_eq!(listed(&page).len(), 25);
    // A plan named in the address is shown as text, and matches no tenant.
    let page = text(&get(&d, "/tenants?plan=%3Ci%3Ex%3C%2Fi%3E", true).await);
    assert!(!page.contains("<i>"), "{page}");
    assert!(page.contains("&lt;i&gt;x&lt;/i&gt;"), "{page}");
    assert!(listed(&page).is_empty());
}

/// Two nodes over one memory store: the overview, the list and a tenant's page show the
/// fleet's requests, added up from both nodes' tallies (tests/common/fleet_tallies.rs).
#[tokio::test]
async fn two_nodes_add_up_to_the_fleet_in_memory() {
    crate::fleet_tallies::two_nodes_add_up_to_the_fleet(Arc::new(MemoryStore::new())).await;
}

/// A request its route's hold refuses is tallied refused, not admitted; a prepaid balance
/// answered 429 (`limits.balance_status`) is tallied `credits_exhausted`, not a quota's.
#[tokio::test]
async fn refusals_at_a_hold_and_of_a_balance_are_tallied_as_what_they_are() {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let now = now - now.rem_euclid(60) + 5;
    let toml = r#"
[limits]
balance_status = 429
[meters.tokens]
[meters.credits]
[plans.p]
quotas.tokens = { limit = 50, period = "day", mode = "hard" }
[plans.prepaid]
quotas.credits = { period = "prepaid" }
[[routes]]
path = "/draw"
reports = ["tokens"]
hold.tokens = 60
[[routes]]
path = "/buy"
meter = "credits"
[tenants.t]
plan = "p"
keys = ["key-t"]
[tenants.u]
plan = "prepaid"
keys = ["key-u"]
"#;
    let memory = Arc::new(MemoryStore::new());
    let h = crate::common::Harness::with_store(toml, memory.clone(), now);
    assert_eq!(h.status("/draw", "key-t").await, 400, "a hold past the whole limit");
    assert_eq!(h.status("/draw", "key-t").await, 400);
    assert_eq!(h.status("/buy", "key-u").await, 429, "an empty balance, as configured");
    // Refused by its handler once admitted: a feature its plan lacks, a hold past the limit.
    let info = tollgate::door::RequestInfo::new("GET", "/other", tollgate::door::Credential::ApiKey(b"key-t"));
    let ticket = match h.tollgate.admit(&info) {
        tollgate::door::Admission::Admitted(t) => t,
        tollgate::door::Admission::Pending(p) => h.tollgate.resolve(p).await.unwrap(),
        tollgate::door::Admission::Rejected(r) => panic!("{r}"),
    };
    let ctx = ticket.context();
    assert!(ctx.require_feature("beta").is_err());
    assert!(ctx.hold("tokens", 60).await.is_err());
    ticket.give_back();
    h.tollgate.flush().await.unwrap();
    let day = now - now.rem_euclid(86_400);
    let q = tollgate::store::TallyQuery::new(tollgate::store::TallyRead::Tenants, day, day + 86_400);
    let tallies = memory.tallies(&q).await.unwrap();
    let of = |t: &str| {
        let tally = tallies.iter().find(|x| x.scope == TallyScope::Tenant(t.into())).expect(t);
        let mut c = tally.counts.clone();
        c.sort();
        c
    };
    let refused = |n: u64| ("hold_exceeds_limit".to_owned(), n);
    assert_eq!(
        of("t"),
        [("admitted".to_owned(), 1), ("feature_not_in_plan".to_owned(), 1), refused(3)],
        "refused at its route's hold, never admitted; then its handler's refusals of the one admitted"
    );
    assert_eq!(of("u"), [("credits_exhausted".to_owned(), 1)]);
}

/// A tally batch whose answer was lost is sent again under its id by the next flush: stored
/// once. Its failure never fails the flush, and a store that refuses it keeps it waiting.
#[tokio::test]
async fn a_tally_whose_answer_was_lost_is_stored_once() {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let now = now - now.rem_euclid(60) + 5;
    let memory = Arc::new(MemoryStore::new());
    let faulty = Arc::new(crate::common::Faulty::over(memory.clone()));
    let h = crate::common::Harness::with_store(crate::fleet_tallies::TOML, faulty.clone(), now);
    for _ in 0..3 {
        assert_eq!(h.status("/v1/items", "key-nobody").await, 401);
    }
    let read = || async {
        let q = tollgate::store::TallyQuery::new(tollgate::store::TallyRead::Fleet, now - 60, now + 60);
        memory.tallies(&q).await.unwrap().iter().map(|t| t.count("unknown_credentials")).sum::<u64>()
    };
    faulty.lose_commit_answers.store(1, std::sync::atomic::Ordering::SeqCst);
    h.tollgate.flush().await.expect("a tally's failure does not fail the flush");
    assert_eq!(read().await, 3, "applied, its answer lost");
    h.tollgate.flush().await.unwrap();
    h.tollgate.flush().await.unwrap();
    assert_eq!(read().await, 3, "sent again under its id: once");
    // The store down: the flush still answers, the tallies wait and land once it is back.
    assert_eq!(h.status("/v1/items", "key-nobody").await, 401);
    faulty.usage_down.store(true, std::sync::atomic::Ordering::SeqCst);
    h.tollgate.flush().await.expect("nothing of usage waits");
    assert_eq!(read().await, 3);
    faulty.usage_down.store(false, std::sync::atomic::Ordering::SeqCst);
    h.tollgate.flush().await.unwrap();
    assert_eq!(read().await, 4);
}

/// A daily chart reads at a glance: a round scale in the meter's units, and the daily quota's
/// limit drawn across it; the hourly chart draws none (no quota is per hour).
#[tokio::test]
async fn a_daily_chart_draws_its_quotas_limit_on_a_round_scale() {
    let (engine, store) = seeded().await;
    let now = engine.clock().unix_secs();
    store.put_tenant(&TenantRecord::new("busy".into(), "free".into()), &[]).await.unwrap();
    let batch = UsageBatch::new(
        FlushId::new("busy"),
        vec![UsageRecord::new("busy".into(), "requests".into(), now - now % 3600, 60)],
    );
    store.commit_usage(&batch).await.unwrap();
    let d = Dashboard::for_engine(&engine, token());
    let page = text(&get(&d, "/tenants/busy", true).await);
    let daily = page.split("class=\"chart daily\"").nth(1).unwrap().split("</figure>").next().unwrap();
    assert!(daily.contains("data-limit=\"100\""), "the limit of 100 a day drawn: {daily}");
    assert!(daily.contains(">100</text>"), "the scale tops at the limit: {daily}");
    assert!(daily.contains(">50</text>") && daily.contains(">0</text>"), "{daily}");
    assert!(daily.contains("class=\"axis end unit\">requests</text>"), "in the meter's units: {daily}");
    assert!(daily.contains(">limit 100 requests</text>"), "{daily}");
    let hourly = page.split("class=\"chart hourly\"").nth(1).unwrap().split("</figure>").next().unwrap();
    assert!(!hourly.contains("data-limit"), "{hourly}");
    assert!(hourly.contains(">100</text>"), "a round top above the highest bar of 60: {hourly}");
}

/// A filter that matches every tenant still reaches each of them once, a window at a time:
/// every match of a window is shown, and the next window starts past it.
#[tokio::test]
async fn a_filter_matching_every_tenant_reaches_each_once() {
    let store = Arc::new(MemoryStore::new());
    let (engine, _worker) = Tollgate::builder(config()).store_arc(store.clone()).build();
    for i in 0..450 {
        store.put_tenant(&TenantRecord::new(format!("t{i:03}").as_str().into(), "free".into()), &[]).await.unwrap();
    }
    let d = Dashboard::for_engine(&engine, token());
    let (mut seen, mut path, mut loads) = (Vec::new(), "/tenants?plan=free".to_owned(), 0);
    loop {
        loads += 1;
        assert!(loads < 10, "the windows end");
        let page = text(&get(&d, &path, true).await);
        let rows = listed(&page);
        assert!(rows.len() <= 200);
        seen.extend(rows);
        match page.split("rel=\"next\" href=\"/ops/").nth(1) {
            Some(rest) => path = format!("/{}", rest.split('"').next().unwrap().replace("&amp;", "&")),
            None => break,
        }
    }
    assert_eq!(seen, (0..450).map(|i| format!("t{i:03}")).collect::<Vec<_>>(), "each tenant once, in id order");
    assert_eq!(loads, 3);
}

/// A mounted tenant page shows its quotas as the tenant's own usage route reads them: the
/// same `used`, `held` and `remaining`, read on the same node; a tenant the node does not hold
/// is not made resident by the page.
#[tokio::test]
async fn a_mounted_tenant_page_shows_the_usage_routes_own_figures() {
    let h = crate::common::Harness::new(
        "[meters.requests]\n[plans.free]\nquotas.requests = { limit = 100, period = \"day\", mode = \"hard\", lease = 10 }\n\
         [tenants.a]\nplan = \"free\"\nkeys = [\"key-a\"]\n[tenants.b]\nplan = \"free\"\nkeys = [\"key-b\"]\n",
    );
    for _ in 0..7 {
        assert_eq!(h.status("/v1/items", "key-a").await, 200);
    }
    h.tollgate.flush().await.unwrap();
    for _ in 0..2 {
        assert_eq!(h.status("/v1/items", "key-a").await, 200);
    }
    let request = http::Request::get("/v1/usage").header("x-api-key", "key-a").body(()).unwrap();
    let answer = h.tollgate.tenant_usage(&request).await;
    let route: serde_json::Value = serde_json::from_slice(answer.body()).unwrap();
    let quota = &route["quotas"][0];
    assert_eq!(quota["used"], 9, "{route}");
    let d = Dashboard::for_engine(&h.tollgate, token());
    let page = text(&get(&d, "/tenants/a", true).await);
    let row = page.split("<tr data-meter=\"requests\">").nth(1).unwrap().split("</tr>").next().unwrap();
    let cells: Vec<String> = row
        .split("<td")
        .skip(1)
        .map(|c| c.split('>').nth(1).unwrap().split('<').next().unwrap().replace(',', ""))
        .collect();
    let want = [
        "requests".to_owned(),
        "day".to_owned(),
        quota["used"].to_string(),
        quota["held"].to_string(),
        quota["remaining"].to_string(),
        "100".to_owned(),
    ];
    assert_eq!(cells, want, "{row}");
    // A tenant this node does not hold is not made resident by a page: the page says so.
    let before = h.tollgate.stats().tracked_tenants;
    let page = text(&get(&d, "/tenants/b", true).await);
    assert!(page.contains("This node holds no state of the tenant"), "{page}");
    assert_eq!(h.tollgate.stats().tracked_tenants, before, "no tenant made resident by a page");
    // Without a node (`tollgate dashboard`), no such table.
    let offline = Dashboard::new(Admin::for_engine(&h.tollgate), token());
    assert!(!text(&get(&offline, "/tenants/a", true).await).contains("As its usage route reads them"));
}

/// The money page lists, in the currency, each tenant's spend against its cap (the most used
/// first), its balances (the least left first), its recharges (the open one first, then one off
/// and why), its payments today and the refunds and disputes of its payments, every row linked
/// to its tenant; a tenant with no money on its plan is in none of its tables, and the page
/// reads a bounded window of tenants with a link to the next.
#[cfg(feature = "stripe")]
#[tokio::test]
async fn the_money_page_shows_spend_balances_recharges_and_reversals_in_the_currency() {
    use tollgate::store::{DisputeStep, PaymentCall};
    let toml = r#"
[store]
kind = "memory"
[billing]
currency = "usd"
[meters.requests]
price = "0.25"
[plans.metered]
rate = "1000/s"
spend = { limit = "10.00", period = "month", mode = "hard" }
[plans.payg]
rate = "1000/s"
quotas.requests = { period = "prepaid" }
[plans.payg.recharge.requests]
price = "price_pack"
below = 300
to = 1000
monthly_limit = "50.00"
[plans.free]
rate = "1000/s"
[stripe]
[stripe.credits]
meter = "requests"
prices = { price_pack = 100 }
"#;
    let store: Arc<dyn tollgate::store::Store> = Arc::new(MemoryStore::new());
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(1_800_000_000);
    // Recharges read their price from Stripe (the stand-in) when turned on, and wait unpaid.
    let stripe = crate::common::stripe::StandIn::start(&[]).await;
    stripe.add_price("price_pack", None, true);
    stripe.set_unit_amount("price_pack", 500);
    let charger = tollgate::billing::RechargeCharger::new(
        &tollgate::billing::Secret::new(crate::common::stripe::SECRET),
        Some(&stripe.url),
        std::time::Duration::from_secs(5),
    )
    .unwrap();
    let (engine, _worker) = Tollgate::builder(Config::from_toml_str(toml).unwrap())
        .store_arc(store.clone())
        .clock(clock)
        .recharge_charger(charger)
        .build();
    let h = crate::common::Harness::from_layer(tollgate::TollgateLayer::new(engine), handle);
    let admin = Admin::for_engine(&h.tollgate);
    let now = h.tollgate.clock().unix_secs();
    let tenants = [
        ("acme", "metered"),
        ("bluth", "metered"),
        ("initech", "payg"),
        ("globex", "payg"),
        ("cyberdyne", "payg"),
        ("hooli", "free"),
        (MARK, "payg"),
    ];
    for (id, plan) in tenants {
        admin.add_tenant(id, plan, None).await.unwrap();
    }
    for i in 0..60 {
        admin.add_tenant(&format!("t{i:03}"), "free", None).await.unwrap();
    }
    let acme = admin.issue_key("acme", Default::default()).await.unwrap().key;
    for _ in 0..6 {
        assert_eq!(h.status("/", &acme).await, 200);
    }
    let bluth = admin.issue_key("bluth", Default::default()).await.unwrap().key;
    for _ in 0..2 {
        assert_eq!(h.status("/", &bluth).await, 200);
    }
    admin.grant_credits("initech", "requests", 500, None, "first").await.unwrap();
    admin.grant_credits("globex", "requests", 100, None, "gift").await.unwrap();
    admin.grant_credits(MARK, "requests", 200, None, &format!("g{MARK}")).await.unwrap();
    admin.set_recharge("initech", "requests", Some(tollgate::money::RechargeAsk::default())).await.unwrap();
    let initech = admin.issue_key("initech", Default::default()).await.unwrap().key;
    for _ in 0..350 {
        assert_eq!(h.status("/", &initech).await, 200);
    }
    assert!(admin.recharge("initech", "requests").await.unwrap().state.open.is_some(), "a recharge is open");
    // globex paid 20.00 today and was refunded 5.00 of it; 15.00 two days ago, disputed.
    let calls = [
        PaymentCall::Record {
            tenant: "globex".into(),
            payment: "pi_today".into(),
            amount: 2_000,
            currency: "usd".into(),
            billing: "usd".into(),
            at: now - 60,
        },
        PaymentCall::Refund { tenant: "globex".into(), payment: "pi_today".into(), refunded: 500, at: now },
        PaymentCall::Record {
            tenant: "globex".into(),
            payment: format!("pi_{MARK}"),
            amount: 1_500,
            currency: "usd".into(),
            billing: "usd".into(),
            at: now - 2 * 86_400,
        },
        PaymentCall::Dispute {
            tenant: "globex".into(),
            payment: format!("pi_{MARK}"),
            dispute: "dp_9".into(),
            amount: 1_500,
            step: DisputeStep::Withdrawn,
            at: now,
        },
    ];
    for call in &calls {
        store.payments(call, now).await.unwrap();
    }
    // cyberdyne's grant of 1,000 units paid 20.00 (pi_u): a refund of 5.00 takes back a quarter
    // of them, a dispute of 2.00 (dp_u) a tenth.
    store
        .grant_credits(&CreditGrant::new("cyberdyne".into(), "requests".into(), "in_u", 1_000, now).paid_by("pi_u"))
        .await
        .unwrap();
    let refund = |refunded: u64| {
        let mut r = tollgate::store::CreditRefund::new("pi_u", refunded, 2_000, now);
        r.tenant = Some("cyberdyne".into());
        r
    };
    store.refund_credits(&refund(500)).await.unwrap();
    store.refund_credits(&refund(200).taking_once("dp_u")).await.unwrap();
    // The nodes give back what they kept unspent: the store holds what was spent.
    h.tollgate.shutdown().await.unwrap();
    let d = Dashboard::for_engine(&h.tollgate, token());
    let r = get(&d, "/money", true).await;
    assert_eq!(r.status(), 200);
    let page = text(&r);
    assert!(page.contains("<a class=\"current\" href=\"/ops/money\">Money</a>"), "in the navigation");
    assert!(!page.contains("<i>x</i>"), "every name escaped");
    let table = |class: &str| -> String {
        let start = format!("<table class=\"{class}\">");
        page.split(&start)
            .nth(1)
            .unwrap_or_else(|| panic!("no {class} table"))
            .split("</table>")
            .next()
            .unwrap()
            .to_owned()
    };
    let link = |id: &str| format!("<a class=\"tenant\" href=\"/ops/tenants/{id}\">{id}</a>");
    let spend = table("spend");
    assert!(spend.contains(&link("acme")), "{spend}");
    let (acme_at, bluth_at) = (spend.find(&link("acme")).unwrap(), spend.find(&link("bluth")).unwrap());
    assert!(acme_at < bluth_at, "the most used cap first: acme's 15% before bluth's 5%: {spend}");
    assert!(spend.contains("<td class=\"n spent\">0.50 USD</td>"), "{spend}");
    assert!(spend.contains("<td class=\"n spent\">1.50 USD</td><td class=\"n cap\">10.00 USD</td>"), "{spend}");
    assert!(spend.contains("hard, the plan's"), "{spend}");
    let balances = table("balances");
    let (globex, initech) = (balances.find(&link("globex")).unwrap(), balances.find(&link("initech")).unwrap());
    assert!(globex < initech, "the least left first: globex's 100 before initech's 150: {balances}");
    assert!(balances.contains("<td class=\"n left\">100</td>"), "{balances}");
    assert!(balances.contains("<td class=\"n left\">150</td>"), "{balances}");
    let recharges = table("recharges");
    let open = recharges.find("open: recharge 1 of ").expect("initech's open recharge");
    let off = recharges.find("off: not_turned_on").expect("globex's, off");
    assert!(open < off, "the open one first: {recharges}");
    assert!(recharges.contains("of 50.00 USD"), "the month's limit in the currency: {recharges}");
    assert!(page.contains("paid today (UTC) by these 50 tenants: <strong>20.00 USD</strong> in 1 payments"), "{page}");
    let reversals = table("reversals");
    assert!(reversals.contains("refunded 5.00 USD"), "{reversals}");
    assert!(reversals.contains("dispute dp_9 of 15.00 USD: funds withdrawn"), "{reversals}");
    assert!(
        reversals.contains(&format!("payment <code>pi_{}</code>", "&lt;i&gt;x&lt;/i&gt;&quot;&#39;")),
        "{reversals}"
    );
    // What each payment no longer counts: 5.00 of pi_today, the whole 15.00 of the disputed one.
    let taken: Vec<&str> =
        reversals.split("<td class=\"n taken\">").skip(1).map(|c| c.split('<').next().unwrap()).collect();
    assert!(taken.contains(&"5.00 USD") && taken.contains(&"15.00 USD"), "{taken:?}");
    // cyberdyne's grant: 250 units to the refund, 100 to the dispute.
    let grant =
        reversals.split("grant <code>in_u</code>").nth(1).expect("cyberdyne's grant").split("</tr>").next().unwrap();
    assert!(grant.contains("<td class=\"n taken\">350 units</td>"), "{grant}");
    assert!(grant.contains("dispute dp_u: 100 units; refunds: 250 units"), "{grant}");
    // No money on its plan: in no table.
    assert!(!page.contains("/ops/tenants/hooli\""), "a free tenant is in no table");
    // A window of 50 tenants in id order, and the next: the rest, with no link further.
    assert!(page.contains("The money of 50 tenants read"), "{page}");
    let next = page.split("<a rel=\"next\" href=\"").nth(1).expect("a next page").split('"').next().unwrap();
    assert_eq!(next, "/ops/money?after=t042");
    let second = text(&get(&d, next.strip_prefix("/ops").unwrap(), true).await);
    assert!(second.contains("The money of 17 tenants read"), "{second}");
    assert!(!second.contains("rel=\"next\""), "the last page");
    assert!(second.contains("no spend cap among them"));
}

/// A meter with dimensions is charted as its total (its series summed into it, never a chart
/// per series), and broken down by series beside: each series' values, its usage in the last 24
/// hours and in the days read, the most used first.
#[tokio::test]
async fn a_meter_with_dimensions_is_charted_whole_and_broken_down_by_series() {
    let toml = r#"
[store]
kind = "memory"
[meters.requests]
[meters.tokens]
dimensions = ["model", "kind"]
values.model = ["m-small", "m-large"]
values.kind = ["input", "output"]
[plans.p]
quotas.tokens = { limit = 5000, period = "day", mode = "soft" }
"#;
    let store = Arc::new(MemoryStore::new());
    let (engine, _worker) = Tollgate::builder(Config::from_toml_str(toml).unwrap()).store_arc(store.clone()).build();
    let now = engine.clock().unix_secs();
    let hour = now - now % 3600;
    store.put_tenant(&TenantRecord::new("acme".into(), "p".into()), &[]).await.unwrap();
    let record = |meter: &str, window: i64, n: u64| UsageRecord::new("acme".into(), meter.into(), window, n);
    let batch = UsageBatch::new(
        FlushId::new("series"),
        vec![
            record("tokens{model=m-small,kind=input}", hour, 700),
            record("tokens{model=m-large,kind=output}", hour, 300),
            record("tokens{model=m-large,kind=output}", hour - 3 * 86_400, 200),
            record("requests", hour, 7),
            // Not a series of a meter declared with dimensions: charted as it is.
            record("requests{x=y}", hour, 5),
        ],
    );
    store.commit_usage(&batch).await.unwrap();
    let d = Dashboard::for_engine(&engine, token());
    let page = text(&get(&d, "/tenants/acme", true).await);
    assert!(!page.contains("tokens{"), "no series charted or named by its id: {page}");
    let charts: Vec<&str> = page
        .split("<figure class=\"chart hourly\"><figcaption>")
        .skip(1)
        .map(|c| c.split(',').next().unwrap())
        .collect();
    assert_eq!(charts, ["requests", "requests{x=y}", "tokens"], "one chart per meter, a stray row apart");
    let hourly = page.split("<figure class=\"chart hourly\"><figcaption>tokens").nth(1).unwrap();
    let hourly = hourly.split("</figure>").next().unwrap();
    let bars: u64 =
        hourly.split("data-value=\"").skip(1).map(|v| v.split('"').next().unwrap().parse::<u64>().unwrap()).sum();
    assert_eq!(bars, 1000, "the total of its series in the last 48 hours");
    let table = page
        .split("<table class=\"breakdown\" data-meter=\"tokens\">")
        .nth(1)
        .expect("a breakdown of tokens")
        .split("</table>")
        .next()
        .unwrap();
    let head = "<th>model</th><th>kind</th><th>windows started in the last 24 hours</th><th>the last 30 days</th>";
    assert!(table.contains(head), "{table}");
    let rows: Vec<&str> = table.split("<tr>").skip(2).collect();
    assert_eq!(rows.len(), 2, "{table}");
    // The most used first: m-small's 700 before m-large's 500, against the values' order.
    assert!(
        rows[0].starts_with("<td>m-small</td><td>input</td><td class=\"n\">700</td><td class=\"n\">700</td>"),
        "{table}"
    );
    assert!(
        rows[1].starts_with("<td>m-large</td><td>output</td><td class=\"n\">300</td><td class=\"n\">500</td>"),
        "{table}"
    );
    assert!(page.contains("<h3>tokens by model and kind</h3>"), "{page}");
}
