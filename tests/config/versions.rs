//! Plan versions (`version`, `[plans.NAME.versions.N]`, issue 90): loaded with the id each
//! version is kept by in the directory, references put tenants on the current version, and
//! every bad input refused at its key with a clear error.

use tollgate::{config::PlanId, Config};

const V3: &str = r#"
[plans.pro]
version = 3
rate = "30/s"
[plans.pro.versions.1]
rate = "10/s"
[plans.pro.versions.2]
rate = "20/s"
[tiers.api]
order = ["free", "pro"]
pro = { paid = "5.00" }
[plans.free]
[billing]
currency = "usd"
"#;

#[test]
fn each_version_is_kept_by_its_id_and_references_name_the_current_one() {
    let config = Config::from_toml_str(V3).unwrap();
    let ids: Vec<&str> = config.plans().keys().map(PlanId::as_str).collect();
    assert_eq!(ids, ["free", "pro", "pro@2", "pro@3"]);
    let rate = |id: &str| config.plan(&id.into()).unwrap().rate().unwrap().count().get();
    assert_eq!((rate("pro"), rate("pro@2"), rate("pro@3")), (10, 20, 30), "version 1 is kept by the bare name");
    assert_eq!(rate("pro@7"), 30, "a version the file does not declare is served the current one");
    assert!(config.plan(&"pro@3".into()).unwrap().is_current());
    assert!(!config.plan(&"pro".into()).unwrap().is_current());
    assert_eq!(
        config.put_on("pro").unwrap().id().as_str(),
        "pro@3",
        "a plan's name puts a tenant on its current version"
    );
    assert_eq!(config.put_on("pro@1").unwrap().id().as_str(), "pro");
    assert!(config.put_on("pro@4").is_none() && config.put_on("pro@x").is_none() && config.put_on("pro@02").is_none());
    // The ladder names the plan: it moves tenants to its current version, and knows every
    // version of it as the plan.
    let ladder = config.tier_of(&"pro".into()).expect("version 1 of pro is on the ladder");
    assert_eq!(ladder.plans()[1].as_str(), "pro@3");
    assert_eq!(ladder.position(&"pro@2".into()), Some(1));
}

#[test]
fn a_plan_without_a_version_is_version_1_as_before() {
    let config = Config::from_toml_str("[plans.pro]\nrate = \"1/s\"\n").unwrap();
    let pro = config.plan(&"pro".into()).unwrap();
    assert_eq!((pro.id().as_str(), pro.version(), pro.is_current()), ("pro", 1, true));
}

#[test]
fn bad_versions_are_refused_at_their_key() {
    for (toml, key, says) in [
        ("[plans.pro]\nversion = 0\n", "plans.pro.version", "a version is 1 to 1000, not 0"),
        ("[plans.pro]\nversion = -2\n", "plans.pro.version", "not -2"),
        ("[plans.pro]\nversion = 1001\n", "plans.pro.version", "not 1001"),
        ("[plans.pro]\nversion = 2\n[plans.pro.versions.2]\n", "plans.pro.versions.2", "1 to 1"),
        ("[plans.pro]\nversion = 2\n[plans.pro.versions.one]\n", "plans.pro.versions.one", "not `one`"),
        ("[plans.pro]\n[plans.pro.versions.1]\n", "plans.pro.versions.1", "the plan's `version` is 1"),
        ("[plans.pro]\nversion = 3\n[plans.pro.versions.1]\nversion = 1\n", "plans.pro.versions.1.version", "numbered by its key"),
        (
            "[plans.pro]\nversion = 3\n[plans.pro.versions.2.versions.1]\n",
            "plans.pro.versions.2.versions",
            "no versions of its own",
        ),
        // An earlier version is checked as a plan is, at its own table.
        ("[plans.pro]\nversion = 2\n[plans.pro.versions.1]\nrate = \"fast\"\n", "plans.pro.versions.1.rate", "fast"),
        // A reference names a plan, never one of its versions.
        ("[plans.pro]\nversion = 2\n[plans.pro.versions.1]\n[identify]\nunknown = \"anonymous\"\nanonymous_plan = \"pro@1\"\n",
            "identify.anonymous_plan", "unknown plan `pro@1`"),
    ] {
        let e = Config::from_toml_str(toml).expect_err(toml);
        assert_eq!(e.key(), key, "{toml}: {e}");
        assert!(e.line().is_some(), "placed: {e}");
        assert!(e.to_string().contains(says), "{toml}: {e}");
    }
}
