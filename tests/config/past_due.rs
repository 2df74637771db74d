//! `[stripe] past_due_grace` (issue 90, past due with grace): loaded as a duration, and every
//! bad input refused at its key with a clear error.

use std::time::Duration;

use tollgate::Config;

const PLANS: &str = r#"
[plans.free]
[plans.pro]
[stripe.prices]
price_pro = "pro"
"#;

fn statuses(past_due: &str) -> String {
    format!(
        "[stripe.subscription_status]\nincomplete = \"ignore\"\nincomplete_expired = \"free\"\npast_due = \
         \"{past_due}\"\ncanceled = \"free\"\nunpaid = \"free\"\npaused = \"free\"\n"
    )
}

fn with_grace(grace: &str, past_due: &str) -> Result<Config, tollgate::config::ConfigError> {
    Config::from_toml_str(&format!("[stripe]\npast_due_grace = \"{grace}\"\n{PLANS}{}", statuses(past_due)))
}

#[test]
fn a_grace_loads_as_a_duration_and_none_is_the_default() {
    let config = with_grace("3d", "free").unwrap();
    assert_eq!(config.stripe().unwrap().past_due_grace, Some(Duration::from_secs(3 * 86_400)));
    let config = Config::from_toml_str(&format!("{PLANS}{}", statuses("free"))).unwrap();
    assert_eq!(config.stripe().unwrap().past_due_grace, None, "the move happens at once, as before");
}

#[test]
fn a_bad_grace_is_refused_at_its_key() {
    for (grace, past_due, says) in [
        ("-3d", "free", "duration"),
        ("0s", "free", "longer than zero"),
        ("61d", "free", "at most 60d"),
        ("soon", "free", "duration"),
        // A grace delays a move: past_due must make one.
        ("3d", "ignore", "map past_due to a plan"),
    ] {
        let e = with_grace(grace, past_due).expect_err(grace);
        assert_eq!(e.key(), "stripe.past_due_grace", "{grace}: {e}");
        assert!(e.line().is_some(), "placed: {e}");
        assert!(e.to_string().contains(says), "{grace}: {e}");
    }
    // Without subscriptions mapped at all.
    let e = Config::from_toml_str("[plans.free]\n[stripe]\npast_due_grace = \"3d\"\n").expect_err("nothing to delay");
    assert_eq!(e.key(), "stripe.past_due_grace", "{e}");
}
