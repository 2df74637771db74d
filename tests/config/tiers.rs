//! `[tiers.NAME]` (issue 90, tiers): the ladder as loaded, and every bad input refused at its
//! key with a clear error.

use std::time::Duration;

use tollgate::config::{ConfigErrorKind, PlanId};
use tollgate::Config;

const PLANS: &str = r#"
[billing]
currency = "usd"
[plans.tier1]
rate = "5/s"
[plans.tier2]
rate = "50/s"
[plans.tier3]
rate = "500/s"
[plans.other]
"#;

/// OpenAI's first three tiers: $5 paid, then $50 and 7 days, then $1,000 and 30 days.
const LADDER: &str = r#"
[tiers.api]
order = ["tier1", "tier2", "tier3"]
tier2 = { paid = "50.00", age = "7d" }
tier3 = { paid = "1000.00 usd", age = "30d" }
"#;

const DAY: Duration = Duration::from_secs(86_400);

#[test]
fn a_ladder_loads_with_its_thresholds_in_the_currencys_smallest_unit() {
    let config = Config::from_toml_str(&format!("{PLANS}{LADDER}")).unwrap();
    let ladder = config.tier_of(&PlanId::from("tier2")).expect("tier2 is on the ladder");
    assert_eq!(ladder.name(), "api");
    assert_eq!(ladder.plans(), [PlanId::from("tier1"), "tier2".into(), "tier3".into()]);
    assert!(!ladder.downgrade(), "never down unless told");
    let step = ladder.step(&"tier3".into()).unwrap();
    assert_eq!((step.paid(), step.age()), (100_000, 30 * DAY));
    assert_eq!(ladder.step(&"tier1".into()).unwrap().paid(), 0, "the first tier is where tenants start");
    assert!(config.tier_of(&"other".into()).is_none());
    let (t1, t2) = (PlanId::from("tier1"), PlanId::from("tier2"));
    const T: i64 = 1_773_489_600;
    let paid = |p| tollgate::store::Standing::new(p, Some(T));
    assert_eq!(ladder.move_of(&t1, paid(5_000), T + 7 * 86_400, false), Some(&t2));
    assert_eq!(ladder.next(&t1, paid(1_000), T + 86_400), Some((&t2, 4_000, Some(6 * DAY))));
}

/// Bad input: refused at its key, with what is wrong and how to write it.
#[test]
fn tiers_are_checked_by_key() {
    let err = |extra: &str| {
        let e = Config::from_toml_str(&format!("{PLANS}{extra}")).expect_err("refused");
        assert!(e.line().is_some(), "placed: {e}");
        e
    };
    // A plan that does not exist.
    let e = err("[tiers.api]\norder = [\"tier1\", \"nope\"]\nnope = { paid = \"5.00\" }\n");
    assert_eq!((e.kind(), e.key()), (ConfigErrorKind::UnknownReference, "tiers.api.order[1]"), "{e}");
    assert!(e.to_string().contains("unknown plan `nope`"), "{e}");
    // A ladder of one plan, and a plan listed twice or on two ladders.
    let e = err("[tiers.api]\norder = [\"tier1\"]\n");
    assert_eq!(e.key(), "tiers.api.order", "{e}");
    let e = err("[tiers.api]\norder = [\"tier1\", \"tier1\"]\n");
    assert_eq!((e.kind(), e.key()), (ConfigErrorKind::Conflict, "tiers.api.order[1]"), "{e}");
    let e = err(&format!("{LADDER}[tiers.b]\norder = [\"other\", \"tier3\"]\ntier3 = {{ paid = \"5.00\" }}\n"));
    assert_eq!((e.kind(), e.key()), (ConfigErrorKind::Conflict, "tiers.b.order[1]"), "{e}");
    assert!(e.to_string().contains("ladder `api`"), "{e}");
    // Out of order: a higher tier asking for less money or less time, or the same.
    let e = err("[tiers.api]\norder = [\"tier1\", \"tier2\", \"tier3\"]\ntier2 = { paid = \"50.00\" }\ntier3 = { paid = \"5.00\" }\n");
    assert_eq!(e.key(), "tiers.api.tier3.paid", "{e}");
    assert!(e.to_string().contains("lowest first"), "{e}");
    let e = err("[tiers.api]\norder = [\"tier1\", \"tier2\", \"tier3\"]\ntier2 = { age = \"7d\" }\ntier3 = { paid = \"5.00\", age = \"1d\" }\n");
    assert_eq!(e.key(), "tiers.api.tier3.age", "{e}");
    let e = err(
        "[tiers.api]\norder = [\"tier1\", \"tier2\", \"tier3\"]\ntier2 = { age = \"7d\" }\ntier3 = { age = \"7d\" }\n",
    );
    assert_eq!(e.key(), "tiers.api.tier3", "{e}");
    // A threshold in another currency, without a billing currency, or not a whole cent.
    let e = err("[tiers.api]\norder = [\"tier1\", \"tier2\"]\ntier2 = { paid = \"50.00 eur\" }\n");
    assert_eq!(e.key(), "tiers.api.tier2.paid", "{e}");
    assert!(e.to_string().contains("not in the billing currency `usd`"), "{e}");
    let e =
        Config::from_toml_str("[plans.a]\n[plans.b]\n[tiers.api]\norder = [\"a\", \"b\"]\nb = { paid = \"50.00\" }\n")
            .expect_err("no currency");
    assert_eq!(e.key(), "tiers.api", "{e}");
    assert!(e.to_string().contains("[billing] currency"), "{e}");
    let e = err("[tiers.api]\norder = [\"tier1\", \"tier2\"]\ntier2 = { paid = \"0.001\" }\n");
    assert_eq!(e.key(), "tiers.api.tier2.paid", "{e}");
    let e = err("[tiers.api]\norder = [\"tier1\", \"tier2\"]\ntier2 = { paid = \"-5.00\" }\n");
    assert_eq!(e.key(), "tiers.api.tier2.paid", "{e}");
    // A negative or unreadable age.
    let e = err("[tiers.api]\norder = [\"tier1\", \"tier2\"]\ntier2 = { age = \"-7d\" }\n");
    assert_eq!(e.key(), "tiers.api.tier2.age", "{e}");
    assert!(e.to_string().contains("\"7d\""), "{e}");
    // A plan without its threshold, a threshold for the first plan, one for no plan of the
    // ladder, an empty one, and an unknown key inside one.
    let e = err("[tiers.api]\norder = [\"tier1\", \"tier2\"]\n");
    assert_eq!(e.key(), "tiers.api.order[1]", "{e}");
    assert!(e.to_string().contains("no threshold"), "{e}");
    let e =
        err("[tiers.api]\norder = [\"tier1\", \"tier2\"]\ntier1 = { paid = \"1.00\" }\ntier2 = { paid = \"5.00\" }\n");
    assert_eq!(e.key(), "tiers.api.tier1", "{e}");
    let e =
        err("[tiers.api]\norder = [\"tier1\", \"tier2\"]\ntier2 = { paid = \"5.00\" }\ntier9 = { paid = \"9.00\" }\n");
    assert_eq!((e.kind(), e.key()), (ConfigErrorKind::UnknownKey, "tiers.api.tier9"), "{e}");
    let e = err("[tiers.api]\norder = [\"tier1\", \"tier2\"]\ntier2 = {}\n");
    assert_eq!(e.key(), "tiers.api.tier2", "{e}");
    let e = err("[tiers.api]\norder = [\"tier1\", \"tier2\"]\ntier2 = { paid = \"5.00\", days = 7 }\n");
    assert!(e.key().starts_with("tiers.api"), "{e}");
    // A bad ladder name.
    let e = err("[tiers.\"a b\"]\norder = [\"tier1\", \"tier2\"]\ntier2 = { paid = \"5.00\" }\n");
    assert_eq!(e.key(), "tiers.a b", "{e}");
    // A ladder's plan moved to by Stripe, an organization's plan, a tenant of the file, a plan
    // named as the ladder's own keys.
    let statuses = "[stripe.subscription_status]\nincomplete = \"ignore\"\nincomplete_expired = \"other\"\n\
        past_due = \"other\"\ncanceled = \"other\"\nunpaid = \"other\"\npaused = \"other\"\n";
    let e = err(&format!("{LADDER}{statuses}[stripe.prices]\nprice_pro = \"tier2\"\n"));
    assert_eq!((e.kind(), e.key()), (ConfigErrorKind::Conflict, "stripe.prices.\"price_pro\""), "{e}");
    assert!(e.to_string().contains("back and forth"), "{e}");
    let e = err(&format!("{LADDER}[stripe.events]\n\"customer.subscription.created\" = \"tier2\"\n"));
    assert_eq!(e.kind(), ConfigErrorKind::Conflict, "{e}");
    assert!(e.key().starts_with("stripe.events"), "{e}");
    let e = Config::from_toml_str(
        "[billing]\ncurrency = \"usd\"\n[plans.a]\nquotas.requests = { limit = 5, period = \"day\", mode = \"hard\" }\n\
         [plans.b]\n[tiers.api]\norder = [\"a\", \"b\"]\nb = { paid = \"5.00\" }\n[orgs.acme]\nplan = \"a\"\n",
    )
    .expect_err("an organization on a ladder");
    assert_eq!((e.kind(), e.key()), (ConfigErrorKind::Conflict, "orgs.acme.plan"), "{e}");
    let e = err(&format!("{LADDER}[tenants.filed]\nplan = \"tier1\"\nkeys = [\"key-filed\"]\n"));
    assert_eq!((e.kind(), e.key()), (ConfigErrorKind::Conflict, "tenants.filed.plan"), "{e}");
    assert!(e.to_string().contains("tollgate tenants add"), "{e}");
    let e = Config::from_toml_str(
        "[billing]\ncurrency = \"usd\"\n[plans.tier1]\n[plans.order]\n[tiers.api]\norder = [\"tier1\", \"order\"]\n",
    )
    .expect_err("a plan named order");
    assert_eq!(e.key(), "tiers.api.order", "{e}");
    assert!(e.to_string().contains("cannot be named `order`"), "{e}");
    // A ladder of ages alone still counts money paid: without a billing currency it would never
    // move anyone (on main it loaded).
    let e = Config::from_toml_str("[plans.a]\n[plans.b]\n[tiers.api]\norder = [\"a\", \"b\"]\nb = { age = \"7d\" }\n")
        .expect_err("no currency, ages alone");
    assert_eq!(e.key(), "tiers.api", "{e}");
    assert!(e.to_string().contains("[billing] currency"), "{e}");
}
