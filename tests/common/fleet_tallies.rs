//! The fleet's tallies (issue 91, deliverable 1; a module of the engine's and the store's tests,
//! which have the `dashboard` feature): requests admitted and refused on two nodes
//! over one store, and money spent, added up in the store so that either node's dashboard
//! shows the whole fleet's: the overview's figures and top tenants, the tenant list's refusals
//! today, a tenant's page. Tallies are kept by the wall clock, so the nodes' clocks start at
//! the wall clock's now.

use std::sync::Arc;

use bytes::Bytes;
use tollgate::{
    config::DashboardToken,
    dashboard::{Access, Dashboard},
    store::{Store, TallyQuery, TallyRead, TallyScope},
};

use crate::common::Harness;

const TOKEN: &str = "dashboard-token-0123456789-abcdefgh";

/// A rate of 2 a node per hour (each node refuses past it), a price per request, and two
/// tenants of the file (both nodes know them).
pub(crate) const TOML: &str = r#"
[billing]
currency = "usd"
[meters.requests]
price = "0.01"
[plans.free]
rate = "2/h"
burst = 2
spend = { limit = "5.00", period = "month", mode = "hard" }
[tenants.acme]
plan = "free"
keys = ["key-acme"]
[tenants.globex]
plan = "free"
keys = ["key-globex"]
"#;

async fn page(d: &Dashboard, path: &str) -> String {
    let r = http::Request::get(path).header("authorization", format!("Bearer {TOKEN}")).body(Bytes::new()).unwrap();
    let r = d.respond("/ops", r).await;
    assert_eq!(r.status(), 200, "{path}");
    String::from_utf8(r.body().to_vec()).unwrap()
}

/// The text of the first element after `marker` (up to its next tag).
fn cell<'a>(page: &'a str, marker: &str) -> &'a str {
    let rest = page.split(marker).nth(1).unwrap_or_else(|| panic!("{marker} in {page}"));
    rest.split('>').nth(1).unwrap().split('<').next().unwrap()
}

/// Two nodes over `store`: node A admits 2 of acme's 3 requests and globex's 1, node B 2 of
/// acme's 4 and refuses an unknown key; each flushes once. Either node's dashboard then shows
/// the fleet's 5 admitted, 3 refused for their rate and 1 for an unknown key, acme on top of
/// both lists with its 3 refusals, $0.05 spent; a flush again adds nothing.
pub(crate) async fn two_nodes_add_up_to_the_fleet(store: Arc<dyn Store>) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    // Away from a minute's and a day's end: the requests and both flushes fall in one minute.
    let now = if now.rem_euclid(86_400) > 86_400 - 120 { now + 240 } else { now };
    let now = now - now.rem_euclid(60) + 5;
    let a = Harness::with_store(TOML, store.clone(), now);
    let b = Harness::with_store(TOML, store.clone(), now);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(a.status("/v1/items", "key-acme").await);
    }
    statuses.push(a.status("/v1/items", "key-globex").await);
    for _ in 0..4 {
        statuses.push(b.status("/v1/items", "key-acme").await);
    }
    statuses.push(b.status("/v1/items", "key-nobody").await);
    assert_eq!(statuses, [200, 200, 429, 200, 200, 200, 429, 429, 401]);
    a.tollgate.flush().await.unwrap();
    b.tollgate.flush().await.unwrap();

    let minute = now - now.rem_euclid(60);
    let fleet = store.tallies(&TallyQuery::new(TallyRead::Fleet, minute, minute + 60)).await.unwrap();
    assert_eq!(fleet.len(), 1, "{fleet:?}");
    let counts = |t: &tollgate::store::Tally| {
        let mut c = t.counts.clone();
        c.sort();
        c
    };
    let c = |o: &str, n: u64| (o.to_owned(), n);
    assert_eq!(
        counts(&fleet[0]),
        [c("admitted", 5), c("rate_limited", 3), c("spent_nanos", 50_000_000), c("unknown_credentials", 1)]
    );
    let day = now - now.rem_euclid(86_400);
    let tenants = store.tallies(&TallyQuery::new(TallyRead::Tenants, day, day + 86_400)).await.unwrap();
    let scopes: Vec<_> = tenants.iter().map(|t| t.scope.clone()).collect();
    assert_eq!(scopes, [TallyScope::Tenant("acme".into()), TallyScope::Tenant("globex".into())]);
    assert_eq!(counts(&tenants[0]), [c("admitted", 4), c("rate_limited", 3), c("spent_nanos", 40_000_000)]);
    assert_eq!(counts(&tenants[1]), [c("admitted", 1), c("spent_nanos", 10_000_000)]);

    // Flushed again, on both: nothing counted twice.
    a.tollgate.flush().await.unwrap();
    b.tollgate.flush().await.unwrap();
    let again = store.tallies(&TallyQuery::new(TallyRead::Fleet, minute, minute + 60)).await.unwrap();
    assert_eq!(again, fleet);

    // Node A's dashboard sees node B's requests.
    let d = Dashboard::for_engine(&a.tollgate, Access::Token(DashboardToken::new(TOKEN).unwrap()));
    let home = page(&d, "/").await;
    // (last hour, last 24 hours) of an outcome's row.
    let row = |outcome: &str| {
        let row =
            home.split(&format!("<tr data-outcome=\"{outcome}\">")).nth(1).unwrap().split("</tr>").next().unwrap();
        (cell(row, "<td class=\"n hour\"").to_owned(), cell(row, "<td class=\"n day\"").to_owned())
    };
    let both = |s: &str| (s.to_owned(), s.to_owned());
    assert_eq!(row("admitted"), both("5"));
    assert_eq!(row("rate"), both("3"));
    assert_eq!(row("unknown key"), both("1"));
    assert_eq!(row("spent"), both("0.05 USD"));
    assert!(!home.contains("data-outcome=\"quota\""), "no row for an outcome never counted");
    let used = home.split("<table class=\"top used\">").nth(1).unwrap().split("</table>").next().unwrap();
    let listed: Vec<&str> =
        used.split("class=\"tenant\" href=\"/ops/tenants/").skip(1).map(|r| r.split('"').next().unwrap()).collect();
    assert_eq!(listed, ["acme", "globex"], "{used}");
    let refused = home.split("<table class=\"top refused\">").nth(1).unwrap().split("</table>").next().unwrap();
    assert!(refused.contains("/ops/tenants/acme") && !refused.contains("globex"), "{refused}");
    assert_eq!(cell(refused, "<td class=\"n refused\""), "3");
    assert_eq!(cell(refused, "<td class=\"reason\""), "rate");

    // The list's refusals today and the tenant's page are the fleet's too.
    let list = page(&d, "/tenants?sort=refusals").await;
    let cells: Vec<&str> =
        list.split("<td class=\"refusals n\">").skip(1).map(|c| c.split('<').next().unwrap()).collect();
    assert_eq!(cells, ["3", "0"], "{list}");
    let acme = page(&d, "/tenants/acme").await;
    assert_eq!(cell(&acme, "<tr data-outcome=\"rate_limited\"><td>rate_limited</td><td class=\"n\""), "3");
    assert_eq!(cell(&acme, "<tr data-outcome=\"admitted\"><td>admitted</td><td class=\"n\""), "4");
}
