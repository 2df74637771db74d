//! The `tollgate` command, run as a real process on real stores (a SQLite file; the local
//! DynamoDB server), and the same operations through `tollgate::admin` reaching a running engine.
#![allow(missing_docs)]

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::{path::Path, process::Command};

use common::{Harness, NOON};
use tollgate::store::prelude::*;
use tollgate::{
    admin::{Admin, AdminError, KeyOptions},
    Config, Tollgate, TollgateLayer,
};

const PLANS: &str = "[plans.free]\nrate = \"100/s\"\n[plans.pro]\nrate = \"1000/s\"\n";

/// A ladder of tiers over `free`, unlocked by payment.
const LADDER: &str = "[billing]\ncurrency = \"usd\"\n[plans.tier1]\n[plans.tier2]\n[tiers.api]\n\
    order = [\"free\", \"tier1\", \"tier2\"]\ntier1 = { paid = \"5.00\" }\ntier2 = { paid = \"50.00\" }\n";

/// Runs the command in `dir`; (success, stdout, stderr).
fn run(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .current_dir(dir)
        .env_remove("TOLLGATE_CONFIG")
        .output()
        .expect("the command runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the command in `dir` with the Stripe stand-in's key; its standard output, after
/// asserting it succeeded.
#[cfg(feature = "stripe")]
fn with_key(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .current_dir(dir)
        .env_remove("TOLLGATE_CONFIG")
        .env("STRIPE_SECRET_KEY", common::stripe::SECRET)
        .output()
        .unwrap();
    assert!(out.status.success(), "tollgate {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let (success, out, err) = run(dir, args);
    assert!(success, "tollgate {args:?} failed: {err}");
    out
}

fn fails(dir: &Path, args: &[&str]) -> String {
    let (success, _, err) = run(dir, args);
    assert!(!success, "tollgate {args:?} should fail");
    err
}

/// `tollgate check` with `[stripe.credits]` asks Stripe what the secret key may read (it cannot
/// list a key's permissions) and fails naming what the key lacks; an unreachable Stripe is a
/// warning.
#[cfg(feature = "stripe")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_what_the_stripe_key_cannot_read() {
    let stripe = common::stripe::StandIn::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let write = |base: &str| {
        let toml = format!(
            "[store]\nkind = \"memory\"\n[stripe]\napi_base = \"{base}\"\n[stripe.credits]\nmeter = \"requests\"\n\
             prices = {{ price_pack = 100 }}\n[plans.p]\nquotas.requests = {{ period = \"prepaid\" }}\n"
        );
        std::fs::write(dir.path().join("tollgate.toml"), toml).unwrap();
    };
    write(&stripe.url);
    let out = with_key(dir.path(), &["check"]);
    assert!(out.contains("the secret key reads what [stripe.credits] needs"), "{out}");
    stripe.refuse_reads(Some(("/v1/credit_notes", 403)));
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("check")
        .current_dir(dir.path())
        .env_remove("TOLLGATE_CONFIG")
        .env("STRIPE_SECRET_KEY", common::stripe::SECRET)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("Credit notes: read"), "{err}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    write(&base);
    let out = with_key(dir.path(), &["check"]);
    assert!(out.contains("warning: Stripe could not be asked"), "{out}");
}

#[test]
fn check_summarizes_a_configuration_and_names_the_place_of_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tollgate.toml"), format!("[store]\nkind = \"memory\"\n{PLANS}")).unwrap();
    let out = ok(dir.path(), &["check"]);
    assert!(out.contains("configuration OK") && out.contains("store: memory") && out.contains("free: 100/s"), "{out}");
    assert!(out.contains("identifier namespace: drawn by each process"), "{out}");
    // On a SQLite file: drawn when it is made (a check does not make it), then read from it.
    std::fs::write(dir.path().join("file.toml"), format!("[store]\nkind = \"sqlite\"\npath = \"t.db\"\n{PLANS}"))
        .unwrap();
    let out = ok(dir.path(), &["check", "file.toml"]);
    assert!(out.contains("namespace: drawn when t.db is created"), "{out}");
    assert!(!dir.path().join("t.db").exists());
    ok(dir.path(), &["-c", "file.toml", "tenants", "list"]);
    let out = ok(dir.path(), &["check", "file.toml"]);
    let line = out.lines().find(|l| l.contains("identifier namespace")).unwrap();
    let ns = line.rsplit(' ').next().unwrap();
    assert!(ns.len() == 16 && ns.bytes().all(|b| b.is_ascii_hexdigit()), "{out}");
    std::fs::write(dir.path().join("bad.toml"), "[plans.p]\nrate = \"fast\"\n").unwrap();
    let err = fails(dir.path(), &["check", "bad.toml"]);
    assert!(err.contains("bad.toml:2:8") && err.contains("plans.p.rate"), "{err}");
    let err = fails(dir.path(), &["check", "missing.toml"]);
    assert!(err.contains("missing.toml"), "{err}");
}

/// Tenants and keys on the SQLite file the configuration names, then read by an engine opened
/// on the same file: an issued key works, a revoked one does not, a rotated one works until
/// its grace ends, imported keys and hashes work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_and_keys_on_sqlite_reach_an_engine() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!("[store]\nkind = \"sqlite\"\npath = \"t.db\"\n{PLANS}");
    std::fs::write(dir.path().join("tollgate.toml"), &toml).unwrap();
    let d = dir.path();
    ok(d, &["tenants", "add", "acme", "--plan", "free", "--customer", "cus_1"]);
    assert!(fails(d, &["tenants", "add", "acme", "--plan", "free"]).contains("exists already"));
    assert!(fails(d, &["tenants", "add", "beta", "--plan", "gold"]).contains("no plan `gold`"));
    ok(d, &["tenants", "set-plan", "acme", "pro"]);
    let list = ok(d, &["tenants", "list"]);
    assert!(list.contains("acme") && list.contains("pro") && list.contains("cus_1"), "{list}");
    let key = ok(d, &["keys", "issue", "acme"]).trim().to_owned();
    assert!(key.starts_with("tg_live_") && key.len() == 40, "{key}");
    let revoked = ok(d, &["keys", "issue", "acme"]).trim().to_owned();
    let rotated = ok(d, &["keys", "issue", "acme"]).trim().to_owned();
    let keys = ok(d, &["keys", "list", "acme"]);
    assert!(keys.contains(&format!("{}…", &key[..12])), "{keys}");
    assert!(!keys.contains(&key), "a key is never shown again");
    let id_of = |k: &str| tollgate::store::KeyHash::of(k.as_bytes()).id();
    ok(d, &["keys", "revoke", "acme", &id_of(&revoked)]);
    assert!(fails(d, &["keys", "revoke", "acme", "k_000000000000"]).contains("no key"));
    // Scopes: the default unless named; changed whole; a rotation keeps them; a bad name is
    // refused and changes nothing.
    let payer = ok(d, &["keys", "issue", "acme", "--scopes", "usage:read,recharge:write"]).trim().to_owned();
    let keys = ok(d, &["keys", "list", "acme"]);
    let line_of = |keys: &str, k: &str| keys.lines().find(|l| l.contains(&id_of(k))).unwrap().to_owned();
    assert!(line_of(&keys, &payer).ends_with("usage:read,recharge:write"), "{keys}");
    assert!(line_of(&keys, &key).ends_with("usage:read,caps:write,alerts:write"), "{keys}");
    assert!(fails(d, &["keys", "scopes", "acme", &id_of(&payer), "billing:write"]).contains("not a key scope"));
    assert!(ok(d, &["keys", "scopes", "acme", &id_of(&rotated), "caps:write"]).contains("has scopes caps:write"));
    let replacement = ok(d, &["keys", "rotate", "acme", &id_of(&rotated), "--grace", "1h"]).trim().to_owned();
    let keys = ok(d, &["keys", "list", "acme"]);
    assert!(line_of(&keys, &replacement).ends_with(" caps:write"), "the new key keeps the old one's scopes: {keys}");
    assert!(line_of(&keys, &payer).ends_with("usage:read,recharge:write"), "a refused change changes nothing: {keys}");
    let hash = tollgate::store::KeyHash::of(b"hashed-legacy-key").to_hex();
    let csv = format!("tenant,plan,customer,key,key_sha256\nglobex,free,cus_2,legacy-key-1,\nglobex,,,,{hash}\n");
    std::fs::write(d.join("keys.csv"), csv).unwrap();
    assert!(ok(d, &["keys", "import", "keys.csv"]).contains("1 tenants created, 0 updated, 2 keys"));
    assert!(ok(d, &["keys", "import", "keys.csv"]).contains("0 tenants created"), "importing again changes nothing");
    std::fs::write(d.join("bad.csv"), "tenant,plan,key\nnew,free,k-1\nnew2,,k-2\n").unwrap();
    let err = fails(d, &["keys", "import", "bad.csv"]);
    assert!(err.contains("bad.csv: line 3") && err.contains("needs a plan"), "{err}");
    assert!(!ok(d, &["tenants", "list"]).contains("new"), "a bad import writes nothing");

    let mut config = Config::from_toml_str(&toml.replace("t.db", &d.join("t.db").display().to_string())).unwrap();
    config = config.clone();
    let (engine, _worker) = Tollgate::builder(config).open().await.unwrap();
    let h = Harness::from_layer(TollgateLayer::new(engine), tollgate::clock::Clock::fake_at_unix(NOON).1);
    for (k, want) in [
        (key.as_str(), 200),
        (replacement.as_str(), 200),
        (rotated.as_str(), 200),
        (revoked.as_str(), 401),
        ("legacy-key-1", 200),
        ("hashed-legacy-key", 200),
    ] {
        assert_eq!(h.status("/", k).await, want, "{k}");
    }
    assert!(ok(d, &["usage", "acme"]).contains("0 windows"));
}

/// `usage --meter` of a meter with dimensions lists its series, where its usage is recorded;
/// of a selector, the series it matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_of_a_meter_with_dimensions_lists_its_series() {
    use tollgate::store::{FlushId, SqliteStore, UsageBatch, UsageRecord};
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[store]\npath = \"t.db\"\n[meters.requests]\n\
         [meters.tokens_v2]\n[meters.tokens]\ndimensions = [\"model\", \"kind\"]\n\
         values.model = [\"m-large\", \"m-small\"]\nvalues.kind = [\"input\", \"output\"]\n{PLANS}\
         [tenants.acme]\nplan = \"free\"\nkeys = [\"key-acme\"]\n"
    );
    std::fs::write(dir.path().join("tollgate.toml"), toml).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let window = now - now.rem_euclid(3600) - 2 * 3600;
    let store = SqliteStore::open(dir.path().join("t.db")).await.unwrap();
    let records = vec![
        UsageRecord::new("acme".into(), "tokens{model=m-large,kind=output}".into(), window, 70),
        UsageRecord::new("acme".into(), "tokens{model=m-small,kind=input}".into(), window, 30),
        UsageRecord::new("acme".into(), "requests".into(), window, 2),
        UsageRecord::new("acme".into(), "tokens_v2".into(), window, 5),
    ];
    store.commit_usage(&UsageBatch::new(FlushId::new("f1"), records)).await.unwrap();
    drop(store);

    let all = ok(dir.path(), &["usage", "acme", "--meter", "tokens"]);
    assert!(
        all.contains("tokens{model=m-large,kind=output}") && all.contains("tokens{model=m-small,kind=input}"),
        "{all}"
    );
    assert!(!all.contains("requests") && !all.contains("tokens_v2") && all.contains("2 windows, 100 units"), "{all}");
    let large = ok(dir.path(), &["usage", "acme", "--meter", "tokens{model=m-large}"]);
    assert!(large.contains("1 windows, 70 units") && !large.contains("m-small"), "{large}");
    let one = ok(dir.path(), &["usage", "acme", "--meter", "tokens{model=m-small,kind=input}"]);
    assert!(one.contains("1 windows, 30 units"), "{one}");
    let plain = ok(dir.path(), &["usage", "acme", "--meter", "requests"]);
    assert!(plain.contains("1 windows, 2 units"), "{plain}");
    let err = fails(dir.path(), &["usage", "acme", "--meter", "tokens{model"]);
    assert!(err.contains("tokens{model"), "a malformed selector is refused by name: {err}");
}

/// `tollgate orgs show`: an organization's plan, its tenants and its counters, which an
/// engine on the same file filled as its tenants' requests passed its month; an organization
/// the file does not declare is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_organizations_counters_are_shown_with_its_tenants() {
    use tollgate::door::{Admission, Credential, RequestInfo};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let toml = format!("[store]\npath = {:?}\n", db.to_str().unwrap())
        + "[plans.project]\nquotas.requests = { limit = 100, period = \"month\", mode = \"hard\" }\n\
        [plans.company]\nquotas.requests = { limit = 150, period = \"month\", mode = \"hard\" }\n\
        [orgs.acme]\nplan = \"company\"\n\
        [tenants.search]\nplan = \"project\"\norg = \"acme\"\nkeys = [\"key-search\"]\n\
        [tenants.support]\nplan = \"project\"\norg = \"acme\"\nkeys = [\"key-support\"]\n\
        [tenants.solo]\nplan = \"project\"\n";
    std::fs::write(dir.path().join("tollgate.toml"), toml).unwrap();
    let config = Config::from_path(dir.path().join("tollgate.toml")).unwrap();
    let (engine, _worker) = Tollgate::builder(config).open().await.unwrap();
    for key in [&b"key-search"[..], b"key-search", b"key-support"] {
        let ticket = match engine.admit(&RequestInfo::new("GET", "/", Credential::ApiKey(key))) {
            Admission::Admitted(t) => t,
            Admission::Pending(p) => engine.resolve(p).await.unwrap(),
            Admission::Rejected(r) => panic!("{r}"),
        };
        assert!(ticket.complete(200));
    }
    engine.shutdown().await.unwrap();
    let out = ok(dir.path(), &["orgs", "show", "acme"]);
    assert!(out.contains("on plan company") && out.contains("tenants: search, support"), "{out}");
    let line = out.lines().find(|l| l.starts_with("requests")).unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains(" 3 "), "the organization's counter holds its tenants' 3 requests: {out}");
    let search = ok(dir.path(), &["quota", "show", "search"]);
    assert!(search.lines().any(|l| l.starts_with("requests") && l.contains(" 2 ")), "{search}");
    assert!(fails(dir.path(), &["orgs", "show", "nope"]).contains("no organization `nope`"));
}

/// `tenants set-override` checks the overrides against the configuration before writing
/// them; an engine on the file serves the tenant with them; `clear-override` removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_overrides_from_the_command_line_reach_an_engine() {
    let dir = tempfile::tempdir().unwrap();
    let toml =
        format!("[store]\nkind = \"sqlite\"\npath = \"t.db\"\n{PLANS}[[routes]]\npath = \"/sso\"\nfeature = \"sso\"\n");
    std::fs::write(dir.path().join("tollgate.toml"), &toml).unwrap();
    let d = dir.path();
    ok(d, &["tenants", "add", "acme", "--plan", "free"]);
    let err =
        fails(d, &["tenants", "set-override", "acme", r#"{"quotas": {"tokens": {"limit": 5, "period": "day"}}}"#]);
    assert!(err.contains("overrides.quotas.tokens") && err.contains("unknown meter"), "{err}");
    let err = fails(d, &["tenants", "set-override", "acme", r#"{"rate": "7/s", "burst": 0}"#]);
    assert!(err.contains("overrides.burst"), "{err}");
    assert!(fails(d, &["tenants", "set-override", "nobody", "{}"]).contains("nobody"));
    let out = ok(d, &["tenants", "set-override", "acme", r#"{"rate": "7/s", "features": ["sso"]}"#]);
    assert!(out.contains("\"rate\":\"7/s\""), "{out}");
    assert!(ok(d, &["tenants", "list"]).contains("\"features\":[\"sso\"]"));
    let key = ok(d, &["keys", "issue", "acme"]).trim().to_owned();

    let config = Config::from_toml_str(&toml.replace("t.db", &d.join("t.db").display().to_string())).unwrap();
    let (engine, _worker) = Tollgate::builder(config).open().await.unwrap();
    let h = Harness::from_layer(TollgateLayer::new(engine.clone()), tollgate::clock::Clock::fake_at_unix(NOON).1);
    let r = h.get("/sso", &key).await;
    assert_eq!(r.status.as_u16(), 200);
    assert!(r.header("ratelimit-policy").unwrap().contains("\"rate\";q=7;w=1"));
    ok(d, &["tenants", "clear-override", "acme"]);
    engine.invalidate_tenant(&"acme".into());
    assert_eq!(h.status("/sso", &key).await, 403);
}

/// The Rust API: the same operations, with their errors; an expired key no longer works and a
/// rotation's old key stops at the end of its grace.
#[tokio::test]
async fn the_admin_api_issues_rotates_and_expires_keys() {
    let config = Config::from_toml_str(&format!("[store]\nkind = \"memory\"\n{PLANS}")).unwrap();
    let admin = Admin::open(&config).await.unwrap();
    admin.add_tenant("acme", "free", None).await.unwrap();
    assert!(matches!(admin.add_tenant("a b", "free", None).await, Err(AdminError::Invalid(_))));
    assert!(matches!(admin.issue_key("nobody", KeyOptions::default()).await, Err(AdminError::UnknownTenant(_))));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let expired = admin.issue_key("acme", KeyOptions::default().expiring(now - 1)).await.unwrap();
    let old = admin.issue_key("acme", KeyOptions::default()).await.unwrap();
    let new = admin.rotate_key("acme", &old.record.id, now - 1).await.unwrap();
    let (engine, _worker) = Tollgate::builder(config).directory_store(admin.directory_store().clone()).build();
    let h = Harness::from_layer(TollgateLayer::new(engine), tollgate::clock::Clock::fake_at_unix(NOON).1);
    assert_eq!(h.status("/", &new.key).await, 200);
    assert_eq!(h.status("/", &expired.key).await, 401, "expired");
    assert_eq!(h.status("/", &old.key).await, 401, "its grace ended");
    let keys = admin.keys("acme").await.unwrap();
    assert_eq!(keys.len(), 3, "expired keys stay listed");
    // Importing a key the tenant holds keeps what the line does not say (the rotation's end).
    admin.import_csv(&format!("tenant,key\nacme,{}\n", old.key)).await.unwrap();
    let held = admin.keys("acme").await.unwrap().into_iter().find(|k| k.id == old.record.id).unwrap();
    assert_eq!(held.expires_at, Some(now - 1));
    assert_eq!(h.status("/", &old.key).await, 401, "still expired");
    // A key of another tenant: the line is named and nothing is written.
    admin.add_tenant("beta", "free", None).await.unwrap();
    let e = admin.import_csv(&format!("tenant,plan,key\nnew,free,fresh-key-1\nbeta,,{}\n", new.key)).await;
    assert!(matches!(&e, Err(AdminError::Import { line: 3, .. })), "{e:?}");
    assert!(e.unwrap_err().to_string().contains("belongs to tenant `acme`"));
    assert!(admin.tenants().await.unwrap().iter().all(|t| t.id.as_str() != "new"), "nothing written");
    assert!(format!("{new:?}").contains('…') && !format!("{new:?}").contains(&new.key), "Debug hides the key");
}

/// `dynamodb create-table` and the directory commands on the local DynamoDB server, with the
/// standard AWS environment.
#[cfg(feature = "dynamodb")]
#[tokio::test]
async fn the_command_works_on_dynamodb() {
    let Some(endpoint) = common::dynamo::endpoint() else { return };
    let dir = tempfile::tempdir().unwrap();
    let table = format!("tollgate-cli-{}", std::process::id());
    let toml = format!("[store]\nkind = \"dynamodb\"\ntable = \"{table}\"\nendpoint = \"{endpoint}\"\n{PLANS}");
    std::fs::write(dir.path().join("tollgate.toml"), &toml).unwrap();
    let d = dir.path();
    assert!(fails(d, &["tenants", "list"]).contains(&table), "a missing table is named");
    ok(d, &["dynamodb", "create-table"]);
    ok(d, &["tenants", "add", "acme", "--plan", "free"]);
    let key = ok(d, &["keys", "issue", "acme", "--expires-in", "30d"]).trim().to_owned();
    let list = ok(d, &["keys", "list", "acme"]);
    assert!(list.contains(&tollgate::store::KeyHash::of(key.as_bytes()).id()), "{list}");
    let (engine, _worker) = Tollgate::builder(Config::from_toml_str(&toml).unwrap()).open().await.unwrap();
    let h = Harness::from_layer(TollgateLayer::new(engine), tollgate::clock::Clock::fake_at_unix(NOON).1);
    assert_eq!(h.status("/", &key).await, 200);
    let check = ok(d, &["check"]);
    let ns = check.lines().find(|l| l.contains("identifier namespace")).unwrap();
    assert_eq!(ns.rsplit(' ').next().unwrap().len(), 16, "create-table drew one: {check}");
    assert!(ok(d, &["dynamodb", "init-namespace"]).contains("has its identifier namespace"), "drawn once");
    assert!(ok(d, &["export", "--repair-ttl"]).contains("0 dead letters"), "nothing to mend");
    // On a SQLite file, a clear refusal.
    std::fs::write(d.join("file.toml"), format!("[store]\nkind = \"sqlite\"\npath = \"t.db\"\n{PLANS}")).unwrap();
    assert!(fails(d, &["-c", "file.toml", "export", "--repair-ttl"]).contains("DynamoDB"));
}

/// `tollgate migrate` and the directory commands on the local PostgreSQL server, and a
/// directory moved there from a SQLite file with `copy-directory`: the keys issued on the file
/// reach an engine on PostgreSQL.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn the_command_works_on_postgres_and_a_directory_moves_there_from_sqlite() {
    let Some(options) = common::postgres::fresh() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The service's role only verifies the schema; the owner migrates it.
    let pg = format!(
        "[store]\nkind = \"postgres\"\nurl = \"{}\"\nschema = \"{}\"\nmigrate = \"verify\"\n{PLANS}",
        options.url, options.schema
    );
    std::fs::write(d.join("pg.toml"), &pg).unwrap();
    std::fs::write(d.join("file.toml"), format!("[store]\nkind = \"sqlite\"\npath = \"t.db\"\n{PLANS}")).unwrap();
    assert!(fails(d, &["-c", "pg.toml", "tenants", "list"]).contains("tollgate migrate"), "a missing schema says how");
    assert!(ok(d, &["-c", "pg.toml", "migrate"])
        .contains(&format!("created at version {}", tollgate::store::POSTGRES_SCHEMA_VERSION)));
    assert!(ok(d, &["-c", "pg.toml", "migrate"]).contains("nothing to do"));
    assert!(fails(d, &["-c", "file.toml", "migrate"]).contains("not PostgreSQL"));

    ok(d, &["-c", "file.toml", "tenants", "add", "acme", "--plan", "free", "--customer", "cus_1"]);
    ok(d, &["-c", "file.toml", "tenants", "add", "globex", "--plan", "pro"]);
    let key = ok(d, &["-c", "file.toml", "keys", "issue", "acme", "--expires-in", "30d"]).trim().to_owned();
    let copied = ok(d, &["-c", "file.toml", "copy-directory", "--to", "pg.toml"]);
    assert!(copied.contains("copied 2 tenants and 1 API keys"), "{copied}");
    // Again: the same records, nothing doubled.
    assert!(
        ok(d, &["-c", "file.toml", "copy-directory", "--to", "pg.toml"]).contains("copied 2 tenants and 1 API keys")
    );
    let tenants = ok(d, &["-c", "pg.toml", "tenants", "list"]);
    assert!(tenants.contains("acme") && tenants.contains("cus_1") && tenants.contains("globex"), "{tenants}");
    let keys = ok(d, &["-c", "pg.toml", "keys", "list", "acme"]);
    assert!(keys.contains(&tollgate::store::KeyHash::of(key.as_bytes()).id()), "{keys}");
    assert!(keys.contains("expires"), "the expiry came along: {keys}");

    let (engine, _worker) = Tollgate::builder(Config::from_toml_str(&pg).unwrap()).open().await.unwrap();
    let h = Harness::from_layer(TollgateLayer::new(engine), tollgate::clock::Clock::fake_at_unix(NOON).1);
    assert_eq!(h.status("/", &key).await, 200);
    let check = ok(d, &["-c", "pg.toml", "check"]);
    assert!(check.contains(&format!("store: postgres schema {}", options.schema)), "{check}");
    assert!(!check.contains(&options.url), "the URL is never shown: {check}");
    let ns = check.lines().find(|l| l.contains("identifier namespace")).unwrap();
    assert_eq!(ns.rsplit(' ').next().unwrap().len(), 16, "the schema drew one: {check}");
}

/// `tollgate export` on a SQLite file against the Stripe stand-in: a dry run sends nothing,
/// a pass sends closed windows once, a refusal is dead-lettered and listed, a requeue sends it
/// again as a new revision; no secret key, a clear error.
#[cfg(feature = "stripe")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_sends_once_lists_dead_letters_and_requeues() {
    use tollgate::store::{FlushId, SqliteStore, UsageBatch, UsageRecord};
    let standin = common::stripe::StandIn::start(&[("api_requests", None)]).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[store]\npath = \"t.db\"\n[meters.requests]\nevent_name = \"api_requests\"\n\
         [meters.ghost]\nevent_name = \"ghost_meter\"\n{PLANS}\
         [tenants.acme]\nplan = \"free\"\nkeys = [\"key-acme\"]\nstripe_customer = \"cus_acme\"\n\
         [tenants.hobby]\nplan = \"free\"\nkeys = [\"key-hobby\"]\n\
         [stripe]\napi_base = \"{}\"\n",
        standin.url
    );
    std::fs::write(dir.path().join("tollgate.toml"), toml).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let window = now - now.rem_euclid(3600) - 2 * 3600;
    let store = SqliteStore::open(dir.path().join("t.db")).await.unwrap();
    let records = vec![
        UsageRecord::new("acme".into(), "requests".into(), window, 7),
        UsageRecord::new("acme".into(), "ghost".into(), window, 3),
        UsageRecord::new("hobby".into(), "requests".into(), window, 5),
    ];
    store.commit_usage(&UsageBatch::new(FlushId::new("f1"), records)).await.unwrap();
    drop(store);

    let with_key = |args: &[&str]| with_key(dir.path(), args);
    let out = with_key(&["export", "--dry-run"]);
    assert!(
        out.contains("api_requests") && out.contains("cus_acme") && out.contains("2 meter events would be sent"),
        "{out}"
    );
    assert!(!out.contains("hobby"), "not billable: {out}");
    assert_eq!(standin.calls(), 0, "a dry run sends nothing");

    let err = fails(dir.path(), &["export"]);
    assert!(err.contains("STRIPE_SECRET_KEY"), "{err}");
    // A key Stripe refuses (401): the pass stops, nothing is parked, the job fails.
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("export")
        .current_dir(dir.path())
        .env_remove("TOLLGATE_CONFIG")
        .env("STRIPE_SECRET_KEY", "sk_test_revoked")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("refused the API key"), "{stderr}");

    let out = with_key(&["export"]);
    assert!(
        out.contains("1 meter events sent (7 units)")
            && out.contains("1 dead-lettered")
            && out.contains("0 retried later"),
        "{out}"
    );
    assert_eq!(standin.totals().get(&("cus_acme".into(), "api_requests".into())), Some(&7));
    let out = with_key(&["export"]);
    assert!(out.contains("0 meter events sent"), "once: {out}");

    let out = with_key(&["export", "--dead-letters"]);
    assert!(out.contains("ghost") && out.contains("refused: 400") && out.contains("1 dead letters"), "{out}");
    assert!(out.contains(&window.to_string()), "{out}");
    let out = with_key(&["export", "--requeue", "acme", "ghost", &window.to_string()]);
    assert!(out.contains("requeued"), "{out}");
    with_key(&["export"]);
    let out = with_key(&["export", "--dead-letters"]);
    // Sent under the identifier of the file's namespace, drawn when it was made.
    let namespace = SqliteStore::read_identifier_namespace(dir.path().join("t.db")).await.unwrap().unwrap();
    let revision_1 = tollgate::billing::identifier_in(&namespace, &"acme".into(), &"ghost".into(), window, 1);
    assert!(out.contains(&revision_1), "refused again as revision 1: {out}");
    let out = with_key(&["export", "--requeue-all"]);
    assert!(out.contains("1 dead letters requeued") && out.contains("0 left"), "{out}");
    let out = with_key(&["export", "--dead-letters"]);
    assert!(out.contains("0 dead letters"), "{out}");
    let err = fails(dir.path(), &["export", "--requeue", "acme", "requests", &window.to_string()]);
    assert!(err.contains("no such dead letter"), "{err}");
}

/// A billing customer belongs to one tenant and is never moved without being asked:
/// `tenants add` and `keys import` with a customer another tenant holds are refused, naming the
/// holder, and change nothing; `--move` moves it. `tenants set-customer` changes a tenant's
/// customer (the runbook's fix for a wrong one), refused the same way, and `--none` removes it.
#[test]
fn a_customer_is_never_moved_silently_and_can_be_changed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tollgate.toml"), format!("[store]\nkind = \"sqlite\"\npath = \"t.db\"\n{PLANS}"))
        .unwrap();
    let d = dir.path();
    let customer_of = |tenant: &str| {
        let list = ok(d, &["tenants", "list"]);
        let line = list.lines().find(|l| l.split_whitespace().next() == Some(tenant)).unwrap().to_owned();
        line.split_whitespace().nth(2).unwrap().to_owned()
    };
    ok(d, &["tenants", "add", "wa", "--plan", "free", "--customer", "cus_WA"]);
    let err = fails(d, &["tenants", "add", "wc", "--plan", "free", "--customer", "cus_WA"]);
    assert!(err.contains("cus_WA") && err.contains("`wa`") && err.contains("--move"), "{err}");
    assert!(!ok(d, &["tenants", "list"]).contains("wc"), "nothing was added");
    assert_eq!(customer_of("wa"), "cus_WA");
    std::fs::write(d.join("k.csv"), "tenant,plan,customer\nwd,free,cus_WA\n").unwrap();
    let err = fails(d, &["keys", "import", "k.csv"]);
    assert!(err.contains("line 2") && err.contains("`wa`"), "{err}");
    assert!(!ok(d, &["tenants", "list"]).contains("wd"), "nothing was imported");

    ok(d, &["tenants", "add", "wc", "--plan", "free", "--customer", "cus_WA", "--move"]);
    assert_eq!((customer_of("wa"), customer_of("wc")), ("-".to_owned(), "cus_WA".to_owned()));

    // A wrong customer mended.
    ok(d, &["tenants", "set-customer", "wa", "cus_WA2"]);
    assert_eq!(customer_of("wa"), "cus_WA2");
    let err = fails(d, &["tenants", "set-customer", "wa", "cus_WA"]);
    assert!(err.contains("`wc`"), "{err}");
    assert_eq!(customer_of("wc"), "cus_WA");
    ok(d, &["tenants", "set-customer", "wa", "cus_WA", "--move"]);
    assert_eq!((customer_of("wa"), customer_of("wc")), ("cus_WA".to_owned(), "-".to_owned()));
    ok(d, &["tenants", "set-customer", "wa", "--none"]);
    assert_eq!(customer_of("wa"), "-");
    assert!(fails(d, &["tenants", "set-customer", "nobody", "cus_x"]).contains("no tenant"));
    assert!(fails(d, &["tenants", "set-customer", "wa", ""]).contains("customer"), "an empty id is refused");
}

/// `tenants set-tier` pins a tenant's tier to a plan of its ladder (and moves it there), and
/// `--unpin` lifts the pin; a plan of no ladder, an unknown plan or tenant is refused and
/// changes nothing.
#[test]
fn a_tier_is_pinned_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tollgate.toml"),
        format!("[store]\nkind = \"sqlite\"\npath = \"t.db\"\n{PLANS}{LADDER}"),
    )
    .unwrap();
    let d = dir.path();
    let plan_of = |tenant: &str| {
        let list = ok(d, &["tenants", "list"]);
        let line = list.lines().find(|l| l.split_whitespace().next() == Some(tenant)).unwrap().to_owned();
        line.split_whitespace().nth(1).unwrap().to_owned()
    };
    ok(d, &["tenants", "add", "acme", "--plan", "free"]);
    let out = ok(d, &["tenants", "set-tier", "acme", "tier2"]);
    assert!(out.contains("`tier2`") && out.contains("pinned"), "{out}");
    assert_eq!(plan_of("acme"), "tier2");
    let err = fails(d, &["tenants", "set-tier", "acme", "pro"]);
    assert!(err.contains("on no ladder") && err.contains("set-plan"), "{err}");
    assert!(fails(d, &["tenants", "set-tier", "acme", "nope"]).contains("nope"));
    assert!(fails(d, &["tenants", "set-tier", "nobody", "tier1"]).contains("no tenant"));
    assert!(fails(d, &["tenants", "set-tier", "acme"]).contains("<PLAN>"), "a plan or --unpin");
    assert_eq!(plan_of("acme"), "tier2", "nothing changed");
    let usage = ok(d, &["usage", "acme"]);
    assert!(usage.contains("tier api: paid 0.00 usd; pinned"), "{usage}");
    let out = ok(d, &["tenants", "set-tier", "acme", "--unpin"]);
    assert!(out.contains("no longer pinned") && out.contains("`tier2`"), "{out}");
    let usage = ok(d, &["usage", "acme"]);
    assert!(usage.contains("tier api: paid 0.00 usd; the top"), "{usage}");
    ok(d, &["tenants", "set-plan", "acme", "free"]);
    let usage = ok(d, &["usage", "acme"]);
    assert!(usage.contains("tier api: paid 0.00 usd; next tier1: 5.00 usd to pay"), "{usage}");
    // Off a ladder: no tier line.
    ok(d, &["tenants", "set-plan", "acme", "pro"]);
    assert!(!ok(d, &["usage", "acme"]).contains("tier"), "on no ladder");
}

/// `tollgate audit [TENANT]` lists who changed what, from what to what, newest first: each
/// change the command made, recorded as made by `--operator` (or `cli:$USER`).
#[test]
fn the_audit_lists_who_changed_what_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tollgate.toml"),
        format!("[store]\nkind = \"sqlite\"\npath = \"t.db\"\n{PLANS}{LADDER}"),
    )
    .unwrap();
    let d = dir.path();
    ok(d, &["tenants", "add", "acme", "--plan", "free"]);
    ok(d, &["tenants", "add", "zeta", "--plan", "free"]);
    ok(d, &["--operator", "ana@ops", "tenants", "set-plan", "acme", "tier1"]);
    ok(d, &["tenants", "set-tier", "acme", "tier2", "--operator", "bo"]);
    let out = ok(d, &["audit", "acme"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].contains("who") && lines[0].contains("before -> after"), "{out}");
    let change = |l: &str| l.split_whitespace().skip(2).collect::<Vec<_>>().join(" ");
    assert_eq!(change(lines[1]), "acme 4 operator:bo tier - -> tier2", "{out}");
    assert_eq!(change(lines[2]), "acme 3 operator:bo plan tier1 -> tier2", "{out}");
    assert_eq!(change(lines[3]), "acme 2 operator:ana@ops plan free -> tier1", "{out}");
    assert!(lines[4].contains(" tenant ") && lines[4].contains("- -> plan=free"), "{out}");
    assert!(lines[4].contains("operator:cli"), "the default operator: {out}");
    assert_eq!(lines[5], "4 changes");
    let all = ok(d, &["audit", "--limit", "2"]);
    assert!(all.contains("operator:bo") && !all.contains("zeta") && all.ends_with("2 changes\n"), "{all}");
    assert!(ok(d, &["audit"]).contains("zeta"), "every tenant's");
    assert!(fails(d, &["audit", "--limit", "0"]).contains("--limit"));
    assert!(fails(d, &["audit", "a b"]).contains("tenant id"));
    assert!(ok(d, &["audit", "nobody"]).ends_with("0 changes\n"));
    // A plan set by hand lifts the pin: both recorded.
    ok(d, &["tenants", "set-plan", "acme", "free", "--operator", "cy"]);
    let out = ok(d, &["audit", "acme", "--limit", "2"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(change(lines[1]), "acme 6 operator:cy tier tier2 -> -", "{out}");
    assert_eq!(change(lines[2]), "acme 5 operator:cy plan tier2 -> free", "{out}");
}

/// Tenants declared in the configuration file are first-class in the command: `tenants list`
/// shows them (with where they come from), and `usage` shows their billing customer.
#[test]
fn tenants_of_the_file_are_listed_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[store]\nkind = \"sqlite\"\npath = \"t.db\"\n{PLANS}\
         [tenants.filed]\nplan = \"pro\"\nkeys = [\"key-filed\"]\nstripe_customer = \"cus_filed\"\n"
    );
    std::fs::write(dir.path().join("tollgate.toml"), toml).unwrap();
    let d = dir.path();
    ok(d, &["tenants", "add", "stored", "--plan", "free", "--customer", "cus_stored"]);
    let list = ok(d, &["tenants", "list"]);
    let line = |t: &str| list.lines().find(|l| l.split_whitespace().next() == Some(t)).unwrap_or_default().to_owned();
    assert!(
        line("filed").contains("pro") && line("filed").contains("cus_filed") && line("filed").contains("file"),
        "{list}"
    );
    assert!(line("stored").contains("cus_stored") && line("stored").contains("store"), "{list}");
    assert!(list.contains("2 tenants"), "{list}");
    let usage = ok(d, &["usage", "filed"]);
    assert!(usage.contains("billing customer cus_filed"), "{usage}");
}

/// A command whose output is closed before it writes (`tollgate … | head -0`, `| grep -q`)
/// neither panics nor stops midway: the tenant it adds is added, and it exits as it would.
#[test]
fn a_closed_output_neither_panics_nor_cuts_a_command_short() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tollgate.toml"), format!("[store]\nkind = \"sqlite\"\npath = \"t.db\"\n{PLANS}"))
        .unwrap();
    let closed = |args: &[&str]| {
        // The pipe's reading end closed before the command starts: every write finds it so.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .current_dir(dir.path())
            .env_remove("TOLLGATE_CONFIG")
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success() && !err.contains("panicked"), "tollgate {args:?}: {:?} {err}", out.status);
    };
    closed(&["tenants", "add", "first", "--plan", "free"]);
    closed(&["tenants", "add", "second", "--plan", "pro"]);
    closed(&["tenants", "list"]);
    let list = ok(dir.path(), &["tenants", "list"]);
    assert!(list.contains("first") && list.contains("second") && list.contains("2 tenants"), "{list}");
}

/// A tenant's Metronome customer is given at `tenants add` and set alone later; `usage` shows
/// the customer of the configured sink's billing system.
#[test]
fn a_tenant_s_metronome_customer_is_added_and_set() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let toml = format!(
        "[store]\nkind = \"sqlite\"\npath = \"t.db\"\n[export]\nsink = \"metronome\"\n{PLANS}\
         [tenants.filed]\nplan = \"pro\"\nstripe_customer = \"cus_filed\"\nmetronome_customer = \"filed-acct\"\n"
    );
    std::fs::write(d.join("tollgate.toml"), toml).unwrap();
    ok(d, &["tenants", "add", "acme", "--plan", "free", "--customer", "cus_acme", "--metronome-customer", "acme-acct"]);
    assert!(ok(d, &["usage", "acme"]).contains("billing customer acme-acct"));
    assert!(ok(d, &["usage", "filed"]).contains("billing customer filed-acct"));
    assert!(ok(d, &["tenants", "set-metronome-customer", "acme", "acme@example.com"]).contains("acme@example.com"));
    assert!(ok(d, &["usage", "acme"]).contains("billing customer acme@example.com"));
    assert!(ok(d, &["tenants", "list"]).contains("cus_acme"), "the Stripe customer stays");
    assert!(ok(d, &["tenants", "set-metronome-customer", "acme", "--none"]).contains("no Metronome customer"));
    assert!(ok(d, &["usage", "acme"]).contains("billing customer -"));
    assert!(fails(d, &["tenants", "set-metronome-customer", "nobody", "x"]).contains("no tenant"));
    assert!(fails(d, &["tenants", "set-metronome-customer", "acme", " "]).contains("Metronome customer"));
    assert!(fails(d, &["tenants", "add", "b", "--plan", "free", "--metronome-customer", ""]).contains("Metronome"));
    assert!(fails(d, &["reconcile"]).contains("metronome"), "reconciliation is Stripe's");
}

/// `tollgate reconcile` on a SQLite file against the Stripe stand-in: the hours Stripe lacks
/// and those it holds more of are printed per tenant, meter and hour; without --fix nothing is
/// noted, with it the lacking hour is noted (acted on by a later pass that agrees).
#[cfg(feature = "stripe")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_prints_the_hours_stripe_lacks_and_holds_more_of() {
    use tollgate::store::{ExportClaim, ExportSend, ExportStore, FlushId, SqliteStore, UsageBatch, UsageRecord};
    let standin = common::stripe::StandIn::start(&[("api_requests", None)]).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[store]\npath = \"t.db\"\n[meters.requests]\nevent_name = \"api_requests\"\n{PLANS}\
         [tenants.acme]\nplan = \"free\"\nkeys = [\"key-acme\"]\nstripe_customer = \"cus_acme\"\n\
         [tenants.globex]\nplan = \"free\"\nkeys = [\"key-globex\"]\nstripe_customer = \"cus_globex\"\n\
         [stripe]\napi_base = \"{}\"\n",
        standin.url
    );
    std::fs::write(dir.path().join("tollgate.toml"), toml).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let window = now - now.rem_euclid(3600) - 3 * 3600;
    // Exported two hours ago (as a node would have): acme 7, globex 2.
    let store = SqliteStore::open(dir.path().join("t.db")).await.unwrap();
    let records = vec![
        UsageRecord::new("acme".into(), "requests".into(), window, 7),
        UsageRecord::new("globex".into(), "requests".into(), window, 2),
    ];
    store.commit_usage(&UsageBatch::new(FlushId::new("f1"), records)).await.unwrap();
    for agg in store.pending_exports(i64::MAX, None, 10).await.unwrap() {
        let customer = format!("cus_{}", agg.key.tenant);
        let send = ExportSend::new(agg.quantity, window + 3599, Some(customer), "api_requests")
            .with_identifier(format!("tg_{}", agg.key.tenant));
        let claim = ExportClaim::new(1, now - 2 * 3600, now - 3600);
        let begun = store.begin_export(&agg, &claim, &send).await.unwrap().unwrap();
        assert!(store.finish_export(&begun, now - 2 * 3600).await.unwrap());
    }
    drop(store);
    // Stripe holds globex's event and one sent by hand; acme's it lost.
    standin.set_now(now - 2 * 3600);
    for (identifier, value) in [("tg_globex", 2), ("by-hand", 5)] {
        standin.inject(common::stripe::Accepted {
            identifier: identifier.into(),
            event_name: "api_requests".into(),
            customer: "cus_globex".into(),
            value,
            timestamp: window + 600,
        });
    }
    standin.set_now(now);

    let reconcile = |args: &[&str]| {
        let mut all = vec!["reconcile"];
        all.extend_from_slice(args);
        with_key(dir.path(), &all)
    };
    let from = window.to_string();
    let out = reconcile(&["--from", &from]);
    let line = |tenant: &str| out.lines().find(|l| l.contains(&format!(" {tenant} "))).unwrap_or_default().to_owned();
    let (acme, globex) = (line("acme"), line("globex"));
    assert!(acme.contains("cus_acme") && acme.contains(" 7 ") && acme.ends_with("reported"), "{out}");
    assert!(globex.contains(" 2 ") && globex.contains(" 7 ") && globex.ends_with("reported"), "{out}");
    assert!(out.contains("Stripe lacks 7 units and holds 5 more"), "{out}");
    assert!(out.contains("2 reads of Stripe"), "{out}");
    let out = reconcile(&["--from", &from, "--tenant", "acme", "--fix"]);
    assert!(out.contains("lacking since") && !out.contains("globex"), "{out}");
    assert!(out.contains("0 resent"), "{out}");
    assert_eq!(standin.calls(), 0, "nothing sent");
    let err = fails(dir.path(), &["reconcile", "--from", "yesterday"]);
    assert!(err.contains("is not a time"), "{err}");

    // A new namespace (after a restore): exports and reconciles first, then changes it.
    let before = SqliteStore::read_identifier_namespace(dir.path().join("t.db")).await.unwrap().unwrap();
    let stdout = with_key(dir.path(), &["export", "--new-namespace"]);
    let after = SqliteStore::read_identifier_namespace(dir.path().join("t.db")).await.unwrap().unwrap();
    assert_ne!(before, after);
    assert!(stdout.contains(&format!("changed from {before} to {after}")), "{stdout}");
    assert_eq!(standin.calls(), 0, "nothing was due");
}

/// A billed plan's tenant that never had a customer: its windows past Stripe's 35 days are one
/// line per (tenant, meter) in `--dead-letters`, confirmed together once billed by hand.
#[cfg(feature = "stripe")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_customer_letters_are_one_line_per_tenant_and_meter() {
    use tollgate::store::{FlushId, SqliteStore, UsageBatch, UsageRecord};
    let standin = common::stripe::StandIn::start(&[("api_requests", None)]).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[store]\npath = \"t.db\"\n[meters.requests]\nevent_name = \"api_requests\"\n\
         [plans.paid]\nbilled = true\n[tenants.wa]\nplan = \"paid\"\nkeys = [\"key-wa\"]\n\
         [stripe]\napi_base = \"{}\"\n",
        standin.url
    );
    std::fs::write(dir.path().join("tollgate.toml"), toml).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let old = now - now.rem_euclid(3600) - 40 * 86_400;
    let store = SqliteStore::open(dir.path().join("t.db")).await.unwrap();
    let records = (0..3).map(|i| UsageRecord::new("wa".into(), "requests".into(), old + i * 3600, 2)).collect();
    store.commit_usage(&UsageBatch::new(FlushId::new("f1"), records)).await.unwrap();
    drop(store);
    let run = |args: &[&str]| with_key(dir.path(), args);
    let out = run(&["export"]);
    assert!(out.contains("3 dead-lettered"), "{out}");
    let out = run(&["export", "--dead-letters"]);
    let lines: Vec<&str> = out.lines().filter(|l| l.contains("no customer")).collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(lines[0].contains("3 windows") && lines[0].contains(" 6 "), "{out}");
    assert!(lines[0].contains("--confirm wa requests all"), "{out}");
    // --requeue-all leaves them (Stripe cannot take them any more).
    let out = run(&["export", "--requeue-all"]);
    assert!(out.contains("reconciled the dead letters Stripe may hold: 0 confirmed, 0 requeued"), "{out}");
    assert!(out.contains("0 dead letters requeued") && out.contains("3 left"), "{out}");
    let out = run(&["export", "--confirm", "wa", "requests", "all"]);
    assert!(out.contains("confirmed: 3 of 3"), "{out}");
    let out = run(&["export", "--dead-letters"]);
    assert!(out.contains("0 dead letters"), "{out}");
    assert_eq!(standin.calls(), 0, "nothing sent to Stripe");
}

/// `tollgate export` with `[export] sink = "metronome"` against the Metronome stand-in: a dry
/// run names the Metronome customer and sends nothing, a pass sends each closed window once in
/// one call, no token is a clear error, reconcile is refused, and `--new-namespace` draws a new
/// namespace without reconciling.
#[cfg(feature = "metronome")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_to_metronome_sends_once_and_draws_a_new_namespace() {
    use tollgate::store::{ExportStore, FlushId, SqliteStore, UsageBatch, UsageRecord};
    let standin = common::metronome::StandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[store]\npath = \"t.db\"\n[export]\nsink = \"metronome\"\n[meters.requests]\nevent_name = \"api_requests\"\n\
         {PLANS}[tenants.acme]\nplan = \"free\"\nmetronome_customer = \"acme-acct\"\n\
         [tenants.globex]\nplan = \"free\"\nmetronome_customer = \"globex-acct\"\n\
         [metronome]\napi_base = \"{}\"\n",
        standin.url
    );
    std::fs::write(dir.path().join("tollgate.toml"), toml).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let window = now - now.rem_euclid(3600) - 2 * 3600;
    let store = SqliteStore::open(dir.path().join("t.db")).await.unwrap();
    let records = vec![
        UsageRecord::new("acme".into(), "requests".into(), window, 7),
        UsageRecord::new("globex".into(), "requests".into(), window, 5),
    ];
    store.commit_usage(&UsageBatch::new(FlushId::new("f1"), records)).await.unwrap();
    let namespace = store.identifier_namespace().await.unwrap();
    drop(store);

    let run = |args: &[&str], token: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.args(args).current_dir(dir.path()).env_remove("TOLLGATE_CONFIG").env_remove("METRONOME_API_TOKEN");
        if let Some(t) = token {
            cmd.env("METRONOME_API_TOKEN", t);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (done, out, _) = run(&["export", "--dry-run"], None);
    assert!(done && out.contains("acme-acct") && out.contains("2 meter events would be sent"), "{out}");
    assert_eq!(standin.calls(), 0, "a dry run sends nothing");
    let (done, _, err) = run(&["export"], None);
    assert!(!done && err.contains("METRONOME_API_TOKEN"), "{err}");
    let (done, out, err) = run(&["export"], Some(common::metronome::TOKEN));
    assert!(done && out.contains("2 meter events sent"), "{out} {err}");
    assert_eq!((standin.calls(), standin.batch_sizes()), (1, vec![2]), "both windows in one call");
    let (done, out, _) = run(&["export"], Some(common::metronome::TOKEN));
    assert!(done && out.contains("0 meter events sent"), "{out}");
    assert_eq!(standin.totals().values().sum::<i64>(), 12);
    let (done, _, err) = run(&["reconcile"], Some(common::metronome::TOKEN));
    assert!(!done && err.contains("metronome"), "{err}");
    let (done, out, err) = run(&["export", "--new-namespace"], Some(common::metronome::TOKEN));
    assert!(done && out.contains("identifier namespace changed from"), "{out} {err}");
    let store = SqliteStore::open(dir.path().join("t.db")).await.unwrap();
    assert_ne!(store.identifier_namespace().await.unwrap(), namespace);
}

/// `tollgate credits`: a grant applies once per id (a drawn id is printed), the list shows the
/// grants and the balance, a revoke takes what the balance still holds, bad input changes nothing.
#[test]
fn credits_are_granted_once_listed_and_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let toml = format!(
        "[store]\nkind = \"sqlite\"\npath = \"t.db\"\n[meters.tokens]\nevent_name = \"tokens\"\n{PLANS}\
         [tenants.acme]\nplan = \"free\"\n"
    );
    std::fs::write(d.join("tollgate.toml"), toml).unwrap();
    assert!(fails(d, &["credits", "grant", "acme-typo", "tokens", "5"]).contains("acme-typo"), "an unknown tenant");
    let out =
        ok(d, &["credits", "grant", "acme", "tokens", "1000", "--id", "inv_1", "--expires-at", "2999-01-01T00:00:00Z"]);
    assert!(out.contains("granted 1000 units") && out.contains("balance 1000"), "{out}");
    assert!(ok(d, &["credits", "grant", "acme", "tokens", "1000", "--id", "inv_1"]).contains("nothing added"));
    let out = ok(d, &["credits", "grant", "acme", "tokens", "250"]);
    let drawn = out.split("under id ").nth(1).and_then(|r| r.split(';').next()).unwrap().to_owned();
    assert!(drawn.starts_with("g_"), "{out}");
    let list = ok(d, &["credits", "list", "acme"]);
    assert!(list.contains("inv_1") && list.contains(&drawn) && list.contains("2999-01-01"), "{list}");
    // A prepaid balance has no period's bounds: `quota show` prints none, not a date in 2448.
    let shown = ok(d, &["quota", "show", "acme"]);
    let line = shown.lines().find(|l| l.starts_with("tokens")).unwrap_or_else(|| panic!("{shown}"));
    assert!(line.contains("prepaid") && !line.contains("2448") && !line.contains("2447"), "{shown}");
    assert!(list.contains("balance of `tokens`: 1250 left"), "{list}");
    let out = ok(d, &["credits", "revoke", "acme", "inv_1"]);
    assert!(out.contains("1000 units"), "{out}");
    let list = ok(d, &["credits", "list", "acme"]);
    assert!(list.contains("revoked") && list.contains("balance of `tokens`: 250 left"), "{list}");
    assert!(fails(d, &["credits", "revoke", "acme", "inv_1"]).contains("no open grant"));
    assert!(fails(d, &["credits", "grant", "acme", "ghost", "5"]).contains("not a meter"));
    assert!(fails(d, &["credits", "grant", "acme", "tokens", "0"]).contains("units"));
    assert!(fails(d, &["credits", "grant", "acme", "tokens", "5", "--expires-at", "2000-01-01T00:00:00Z"])
        .contains("expire"));
    assert!(ok(d, &["credits", "list", "nobody"]).contains("no credit grants"));
}

/// `tollgate tenants set-alert-endpoint`: refused (an error, nothing stored) off a plan with
/// `tenant_alerts`, for a URL that is not https, or one of a private address; stored with its
/// secret printed once otherwise. `tollgate alerts list | dead-letters | retry ID` read the
/// outbox and send a dead letter again.
#[cfg(feature = "alerts")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_tenant_endpoints_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tollgate.toml"),
        "[store]\nkind = \"sqlite\"\npath = \"t.db\"\n[alerts]\nallow_private = [\"127.0.0.1/32\"]\n\
         [plans.free]\nrate = \"10/s\"\n[plans.pro]\nrate = \"10/s\"\ntenant_alerts = true\n",
    )
    .unwrap();
    ok(dir.path(), &["tenants", "add", "acme", "--plan", "pro"]);
    ok(dir.path(), &["tenants", "add", "bob", "--plan", "free"]);
    let err = fails(dir.path(), &["tenants", "set-alert-endpoint", "bob", "https://hooks.example.com/x"]);
    assert!(err.contains("tenant_alerts"), "{err}");
    for bad in ["http://hooks.example.com/x", "https://10.0.0.1/x", "https://169.254.169.254/", "not a url"] {
        let err = fails(dir.path(), &["tenants", "set-alert-endpoint", "acme", bad]);
        assert!(err.starts_with("error:"), "{bad}: {err}");
    }
    let store = tollgate::store::SqliteStore::open(dir.path().join("t.db")).await.unwrap();
    assert_eq!(store.tenant(&"acme".into()).await.unwrap().unwrap().alert_endpoint, None, "nothing stored");
    let out = ok(dir.path(), &["tenants", "set-alert-endpoint", "acme", "http://127.0.0.1:9/hook"]);
    let secret = out.lines().find_map(|l| l.strip_prefix("signing secret (shown once): ")).unwrap();
    assert!(secret.starts_with("whsec_"), "{out}");
    let stored = store.tenant(&"acme".into()).await.unwrap().unwrap().alert_endpoint.unwrap();
    assert!(stored.contains(secret) && stored.contains("127.0.0.1:9"), "{stored}");
    ok(dir.path(), &["tenants", "set-alert-endpoint", "acme", "--none"]);
    assert_eq!(store.tenant(&"acme".into()).await.unwrap().unwrap().alert_endpoint, None);
    // The outbox: a dead letter, listed and sent again.
    use tollgate::store::{AlertClaim, AlertKey, AlertOutcome, OutboxEntry};
    let now = tollgate::clock::Clock::system().unix_secs();
    let row = OutboxEntry::new(
        AlertKey::new("alert_x", "endpoint:ops"),
        "acme".into(),
        "quota.exhausted",
        "{}",
        now,
        now + 86_400,
    );
    store.put_alerts(&[row]).await.unwrap();
    let claimed = store.claim_alerts(&AlertClaim::new(7, now, now + 60, 10)).await.unwrap();
    assert!(store
        .settle_alert(&claimed[0].key, 7, &AlertOutcome::Dead { error: "503 Service Unavailable".into() })
        .await
        .unwrap());
    drop(store);
    let out = ok(dir.path(), &["alerts", "dead-letters"]);
    assert!(
        out.contains("alert_x") && out.contains("503 Service Unavailable") && out.contains("1 dead letters"),
        "{out}"
    );
    let out = ok(dir.path(), &["alerts", "list", "--state", "dead"]);
    assert!(out.contains("alert_x"), "{out}");
    let err = fails(dir.path(), &["alerts", "list", "--state", "lost"]);
    assert!(err.contains("--state"), "{err}");
    ok(dir.path(), &["alerts", "retry", "alert_x"]);
    let out = ok(dir.path(), &["alerts", "list", "--state", "pending"]);
    assert!(out.contains("alert_x"), "{out}");
    let err = fails(dir.path(), &["alerts", "retry", "alert_x"]);
    assert!(err.contains("no dead letter"), "{err}");
}

/// `tollgate tenants set-cap`: a tenant's own spend cap within its plan's `max_limit`; above
/// it, not an amount, or on a plan without a cap: an error, nothing stored. `show-cap` and
/// `--none`.
#[test]
fn spend_caps_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("tollgate.toml"),
        "[store]\nkind = \"sqlite\"\npath = \"t.db\"\n[billing]\ncurrency = \"usd\"\n[meters.requests]\nprice = \"0.01\"\n\
         [plans.free]\nrate = \"10/s\"\n\
         [plans.pro]\nspend = { limit = \"50.00\", max_limit = \"500.00\" }\n\
         [plans.lite]\nspend = { limit = \"5.00\", mode = \"soft\", max_limit = \"50.00\" }\n",
    )
    .unwrap();
    ok(d, &["tenants", "add", "acme", "--plan", "pro"]);
    ok(d, &["tenants", "add", "bob", "--plan", "free"]);
    let shown = ok(d, &["tenants", "show-cap", "acme"]);
    assert!(shown.contains("spend cap 50 usd (hard, the plan's)") && shown.contains("at most 500 usd"), "{shown}");
    for (limit, why) in [("500.01", "above the most"), ("lots", "not a decimal"), ("0", "more than 0")] {
        let err = fails(d, &["tenants", "set-cap", "acme", limit]);
        assert!(err.starts_with("error:") && err.contains(why), "{limit}: {err}");
    }
    assert!(fails(d, &["tenants", "set-cap", "bob", "5.00"]).contains("has no spend cap"));
    assert!(ok(d, &["tenants", "show-cap", "acme"]).contains("the plan's"), "nothing stored");
    let out = ok(d, &["tenants", "set-cap", "acme", "25.00", "--hard"]);
    assert!(out.contains("spend cap 25 usd (hard, the tenant's own)"), "{out}");
    // Soft on a plan whose cap is hard: an error, nothing stored.
    let err = fails(d, &["tenants", "set-cap", "acme", "500", "--soft"]);
    assert!(err.starts_with("error:") && err.contains("is hard too"), "{err}");
    assert!(ok(d, &["tenants", "show-cap", "acme"]).contains("spend cap 25 usd (hard, the tenant's own)"));
    // On a plan whose cap is soft, a soft one of the tenant's.
    ok(d, &["tenants", "add", "cy", "--plan", "lite"]);
    let out = ok(d, &["tenants", "set-cap", "cy", "20", "--soft"]);
    assert!(out.contains("spend cap 20 usd (soft, the tenant's own)"), "{out}");
    let out = ok(d, &["tenants", "set-cap", "acme", "--none"]);
    assert!(out.contains("spend cap 50 usd (hard, the plan's)"), "{out}");
}

/// `quota show` tells apart what a counter holds: reserved, and of it what the running nodes
/// keep unused in their leases and holds, and what is used (issue 52).
#[tokio::test]
async fn quota_show_tells_leased_held_and_used_apart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let toml = format!(
        "[store]\nkind = \"sqlite\"\npath = \"{}\"\n[meters.tokens]\n\
         [plans.p]\nquotas.tokens = {{ limit = 10000, period = \"day\", mode = \"hard\", lease = 500 }}\n\
         [[routes]]\npath = \"/generate\"\nreports = [\"tokens\"]\n\
         [tenants.acme]\nplan = \"p\"\nkeys = [\"key-acme\"]\n",
        d.join("t.db").display()
    );
    std::fs::write(d.join("tollgate.toml"), &toml).unwrap();
    let (engine, _worker) = Tollgate::builder(Config::from_toml_str(&toml).unwrap()).open().await.unwrap();
    let h = Harness::from_layer(TollgateLayer::new(engine), tollgate::clock::Clock::fake_at_unix(NOON).1);
    let (ticket, ctx) = common::holds::admitted(&h, "key-acme").await;
    let mut hold = ctx.hold_with("tokens", 200, tollgate::Overrun::Refuse).await.unwrap();
    hold.record(30).unwrap();
    // What it keeps is told at the flush: its lease's rest, 170 still held, 30 used.
    h.tollgate.flush().await.unwrap();
    let out = ok(d, &["quota", "show", "acme"]);
    let line = out.lines().find(|l| l.starts_with("tokens")).unwrap_or_else(|| panic!("{out}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let n: Vec<u64> = words[words.len() - 6..words.len() - 1].iter().map(|w| w.parse().unwrap()).collect();
    let (reserved, leased, held, jobs, used) = (n[0], n[1], n[2], n[3], n[4]);
    assert_eq!((held, jobs, used), (170, 0, 30), "{out}");
    assert!(leased > 0 && reserved == leased + held + jobs + used, "{out}");
    assert!(out.lines().next().unwrap().contains("leased"), "{out}");
    hold.settle();
    assert!(ticket.complete(200));
}

/// `tollgate credits recharge`: `show` (off until turned on), values outside the plan's
/// bounds refused naming why (nothing stored), turned on with the price read from Stripe
/// (the stand-in), shown, `--off`.
#[cfg(feature = "stripe")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recharge_from_the_command_line() {
    let stripe = common::stripe::StandIn::start(&[]).await;
    stripe.add_price("price_pack", None, true);
    stripe.set_unit_amount("price_pack", 500);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("tollgate.toml"),
        format!(
            "[store]\nkind = \"sqlite\"\npath = \"t.db\"\n[billing]\ncurrency = \"usd\"\n\
             [plans.payg]\nquotas.requests = {{ period = \"prepaid\" }}\n\
             [plans.payg.recharge.requests]\nprice = \"price_pack\"\nbelow = 300\nto = 1000\nmonthly_limit = \"50.00\"\n\
             [plans.free]\nrate = \"10/s\"\n\
             [stripe]\napi_base = \"{}\"\n[stripe.credits]\nmeter = \"requests\"\nprices = {{ price_pack = 100 }}\n",
            stripe.url
        ),
    )
    .unwrap();
    ok(d, &["tenants", "add", "acme", "--plan", "payg"]);
    ok(d, &["tenants", "add", "bob", "--plan", "free"]);
    let shown = ok(d, &["credits", "recharge", "acme", "show"]);
    assert!(shown.contains("recharge of `requests` for `acme`: off (not_turned_on)"), "{shown}");
    assert!(shown.contains("at most 50.00 usd a month"), "{shown}");
    for (args, why) in [
        (&["--to", "1001"][..], "above the most"),
        (&["--below", "900", "--to", "800"][..], "must be under"),
        (&["--monthly-limit", "lots"][..], "not a decimal"),
    ] {
        let mut all = vec!["credits", "recharge", "acme"];
        all.extend_from_slice(args);
        let err = fails(d, &all);
        assert!(err.starts_with("error:") && err.contains(why), "{args:?}: {err}");
    }
    assert!(fails(d, &["credits", "recharge", "bob", "show"]).contains("recharges no meter"));
    assert!(fails(d, &["credits", "recharge", "acme"]).contains("--on for the plan's values"), "never on by default");
    assert!(ok(d, &["credits", "recharge", "acme", "show"]).contains("off (not_turned_on)"), "nothing stored");
    let out =
        with_key(d, &["credits", "recharge", "acme", "--below", "200", "--to", "800", "--monthly-limit", "20.00"]);
    assert!(out.contains(": on") && out.contains("below 200 units, to 800 units, at most 20.00 usd a month"), "{out}");
    assert!(out.contains("packs of 100 units at 5.00 usd"), "{out}");
    let out = ok(d, &["credits", "recharge", "acme", "--off"]);
    assert!(out.contains("off (not_turned_on)"), "{out}");
}

/// A Redis server of the test's own on a free loopback port, started with `args` (no
/// persistence files), killed when dropped.
#[cfg(feature = "redis")]
struct OwnRedis(std::process::Child, String);

#[cfg(feature = "redis")]
impl OwnRedis {
    fn start(dir: &Path, args: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--dir"])
            .arg(dir)
            .args(args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/redis-server.sh installs it)");
        let url = format!("redis://127.0.0.1:{port}");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Self(child, url)
    }
}

#[cfg(feature = "redis")]
impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tollgate check` says what a Redis server the roles name may lose or evict (`appendonly no`,
/// a `maxmemory-policy` other than `noeviction`, which the store refuses unless accepted), read
/// with `INFO` where `CONFIG` is refused (as managed services do), and says the settings are
/// safe when they are.
#[cfg(feature = "redis")]
#[test]
fn check_warns_of_a_redis_server_that_may_lose_or_evict_counters() {
    // The servers are the test's own; the shared one says whether Redis runs here at all.
    if common::redis::url().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = |url: &str| {
        format!(
            "[store]\nkind = \"postgres\"\nurl = \"postgres://tollgate@127.0.0.1:1/none\"\n\
             [store.rate]\nkind = \"redis\"\nurl = \"{url}\"\n{PLANS}"
        )
    };
    let check = |url: &str| {
        let path = dir.path().join("tollgate.toml");
        std::fs::write(&path, config(url)).unwrap();
        ok(dir.path(), &["--config", path.to_str().unwrap(), "check"])
    };
    let unsafe_server = OwnRedis::start(dir.path(), &["--appendonly", "no", "--maxmemory-policy", "allkeys-lru"]);
    let out = check(&unsafe_server.1);
    assert!(out.contains("warning: redis: appendonly is no"), "{out}");
    assert!(out.contains("warning: redis: maxmemory-policy is allkeys-lru, not noeviction"), "{out}");
    let managed = OwnRedis::start(
        dir.path(),
        &["--appendonly", "no", "--maxmemory-policy", "allkeys-lru", "--rename-command", "CONFIG", ""],
    );
    let out = check(&managed.1);
    assert!(out.contains("warning: redis: appendonly is no"), "{out}");
    assert!(out.contains("maxmemory-policy is allkeys-lru, not noeviction: the store refuses to open"), "{out}");
    let safe = OwnRedis::start(dir.path(), &["--appendonly", "yes", "--maxmemory-policy", "noeviction"]);
    let out = check(&safe.1);
    assert!(out.contains("redis: appendonly on, maxmemory-policy noeviction") && !out.contains("warning"), "{out}");
}

/// `tollgate dashboard` off loopback without a token refuses to start, before opening
/// anything; a token file that is too short is refused with its path.
#[test]
fn the_dashboard_refuses_a_network_address_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tollgate.toml"), format!("[store]\nkind = \"memory\"\n{PLANS}")).unwrap();
    let err = fails(dir.path(), &["--config", "tollgate.toml", "dashboard", "--listen", "0.0.0.0:0"]);
    assert!(err.contains("without an access token"), "{err}");
    let err = fails(dir.path(), &["--config", "tollgate.toml", "dashboard", "--listen", "[::]:0"]);
    assert!(err.contains("without an access token"), "{err}");
    std::fs::write(dir.path().join("short"), "abc\n").unwrap();
    let err = fails(
        dir.path(),
        &["--config", "tollgate.toml", "dashboard", "--listen", "0.0.0.0:0", "--token-file", "short"],
    );
    assert!(err.contains("short must hold a token of at least 32 random characters"), "{err}");
    std::fs::write(dir.path().join("plain"), "abcdefgh".repeat(5)).unwrap();
    let err = fails(
        dir.path(),
        &["--config", "tollgate.toml", "dashboard", "--listen", "0.0.0.0:0", "--token-file", "plain"],
    );
    assert!(err.contains("plain must hold a token of 32 random characters"), "{err}");
    assert!(err.contains("repeats its first 8") && err.contains("openssl rand -hex 32"), "{err}");
}

/// On loopback, `tollgate dashboard` needs a token too unless its stores are local files: a
/// shared store (PostgreSQL, DynamoDB, Redis for a role) is refused before anything is opened
/// (the servers named here do not exist).
#[test]
fn the_dashboard_of_a_shared_store_needs_a_token_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    for (store, kind) in [
        ("[store]\nkind = \"postgres\"\nurl = \"postgres://nobody@127.0.0.1:1/none\"\n", "postgres"),
        ("[store]\nkind = \"dynamodb\"\ntable = \"t\"\nendpoint = \"http://127.0.0.1:1\"\n", "dynamodb"),
        (
            "[store]\nkind = \"postgres\"\nurl = \"postgres://nobody@127.0.0.1:1/none\"\n[store.quota]\nkind = \"redis\"\n\
             url = \"redis://127.0.0.1:1\"\n",
            "redis",
        ),
    ] {
        std::fs::write(dir.path().join("tollgate.toml"), format!("{store}{PLANS}")).unwrap();
        let err = fails(dir.path(), &["--config", "tollgate.toml", "dashboard", "--listen", "127.0.0.1:0"]);
        assert!(err.contains(&format!("its store ({kind}) is shared")), "{kind}: {err}");
    }
}

/// `tollgate plans`: a tenant added before `pro` had versions keeps version 1 when version 2
/// is written in the file; `plans versions` counts each; `plans migrate` is a dry run without
/// `--apply` and refuses a version the file does not declare, changing nothing.
#[test]
fn plans_are_migrated_from_the_command_line_after_a_dry_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = d.join("tollgate.toml");
    let store = "[store]\nkind = \"sqlite\"\npath = \"t.db\"\n";
    std::fs::write(&file, format!("{store}[plans.pro]\nrate = \"10/s\"\n")).unwrap();
    ok(d, &["tenants", "add", "acme", "--plan", "pro"]);
    std::fs::write(
        &file,
        format!("{store}[plans.pro]\nversion = 2\nrate = \"20/s\"\n[plans.pro.versions.1]\nrate = \"10/s\"\n"),
    )
    .unwrap();
    ok(d, &["tenants", "add", "beta", "--plan", "pro"]);
    let plan_of = |tenant: &str| {
        let list = ok(d, &["tenants", "list"]);
        let line = list.lines().find(|l| l.split_whitespace().next() == Some(tenant)).unwrap().to_owned();
        line.split_whitespace().nth(1).unwrap().to_owned()
    };
    assert_eq!((plan_of("acme"), plan_of("beta")), ("pro".to_owned(), "pro@2".to_owned()));
    let versions = ok(d, &["plans", "versions"]);
    assert!(versions.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["pro", "1", "1"]), "{versions}");
    assert!(versions.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["pro", "2", "1", "current"]));

    let err = fails(d, &["plans", "migrate", "pro", "--from", "1", "--to", "3", "--apply"]);
    assert!(err.contains("plan `pro` has no version 3"), "{err}");
    let dry = ok(d, &["plans", "migrate", "pro", "--from", "1", "--to", "2"]);
    assert!(dry.contains("would move acme") && dry.contains("a dry run: nothing was written"), "{dry}");
    assert_eq!(plan_of("acme"), "pro", "a dry run writes nothing");
    let done = ok(d, &["plans", "migrate", "pro", "--from", "1", "--to", "2", "--apply", "--batch", "1"]);
    assert!(done.contains("next batch after acme"), "batches of one say where to resume: {done}");
    assert!(done.contains("plan pro: moved 1 tenants from version 1 to 2, kept 0 (2 tenants read)"), "{done}");
    assert_eq!(plan_of("acme"), "pro@2");
}
