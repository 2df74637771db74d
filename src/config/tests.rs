//! The configuration's tests: the file as a whole, placed errors, and the values.

use std::time::Duration;

use super::{document::parse, located::split_path, located::Segment, Rate, RateError, StatusSet};
use super::{ConfigError, ConfigErrorKind as Kind};
use crate::base::{MeterId, Period, PlanId};

mod validation {
    use super::*;

    fn err(text: &str) -> ConfigError {
        parse(text).unwrap_err()
    }

    #[test]
    fn a_tenant_named_like_the_anonymous_tenant_is_refused() {
        let e = err("[identify]\nunknown = \"anonymous\"\nanonymous_plan = \"p\"\n[plans.p]\n[tenants.anonymous]\nplan = \"p\"\n");
        assert_eq!((e.kind(), e.key(), e.line()), (Kind::Conflict, "tenants.anonymous", Some(5)));
        assert!(parse("[plans.p]\n[tenants.anonymous]\nplan = \"p\"\n").is_ok(), "fine without an anonymous plan");
    }

    #[test]
    fn key_scopes_are_names_of_scopes_placed_where_they_stand() {
        use crate::base::{KeyScope, KeyScopes};
        let e = err("[plans.p]\n[tenants.a]\nplan = \"p\"\nkeys = [\"tg_a\"]\nkey_scopes = [\"usage:read\", \"billing:write\"]\n");
        assert_eq!((e.kind(), e.key(), e.line()), (Kind::InvalidValue, "tenants.a.key_scopes[1]", Some(5)));
        assert!(e.to_string().contains("`billing:write` is not a key scope"), "{e}");
        // One scope per entry: a list written as one string is refused.
        let e = err("[plans.p]\n[tenants.a]\nplan = \"p\"\nkey_scopes = [\"usage:read,caps:write\"]\n");
        assert_eq!(e.key(), "tenants.a.key_scopes[0]");
        let scopes = |text: &str| parse(text).unwrap().tenants()[0].key_scopes();
        assert_eq!(scopes("[plans.p]\n[tenants.a]\nplan = \"p\"\n"), KeyScopes::DEFAULT);
        assert_eq!(scopes("[plans.p]\n[tenants.a]\nplan = \"p\"\nkey_scopes = []\n"), KeyScopes::NONE);
        let payer = scopes("[plans.p]\n[tenants.a]\nplan = \"p\"\nkey_scopes = [\"recharge:write\"]\n");
        assert_eq!(payer, KeyScopes::NONE.with(KeyScope::RechargeWrite));
    }

    /// Markup is no name: a plan's, a meter's or a feature's name holding any is refused with
    /// its place; a tenant's id and customers and an organization's name are
    /// visible ASCII, so they can carry it, and are escaped wherever shown.
    #[test]
    fn a_name_holding_markup_is_refused_where_it_stands() {
        let plan = err("[meters.requests]\n[plans.\"<b>x</b>\"]\nrate = \"1/s\"\n");
        assert_eq!((plan.kind(), plan.line()), (Kind::InvalidValue, Some(2)), "{plan}");
        assert!(plan.to_string().contains("names are 1 to 64 characters"), "{plan}");
        let meter = err("[meters.\"a'onclick=x\"]\n[plans.p]\n");
        assert_eq!((meter.kind(), meter.line()), (Kind::InvalidValue, Some(1)), "{meter}");
        let feature = err("[plans.p]\nfeatures = [\"<img>\"]\n");
        assert_eq!((feature.kind(), feature.line()), (Kind::InvalidValue, Some(2)), "{feature}");
        // A tenant of the file may carry it in its id and customer: shown escaped.
        let config =
            parse("[plans.p]\n[tenants.\"<img/src=x>\"]\nplan = \"p\"\nstripe_customer = \"cus_<b>\"\n").unwrap();
        assert_eq!(config.tenants()[0].id().as_str(), "<img/src=x>");
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let e = err("[plans.free]\nrate = \"1/s\"\nrat = 3\n");
        assert_eq!(e.kind(), Kind::UnknownKey);
        assert_eq!(e.key(), "plans.free.rat");
        assert_eq!(e.line(), Some(3));
        let e = err("[usage]\nflush = \"1s\"\n");
        assert_eq!(e.key(), "usage.flush");
        assert_eq!((e.line(), e.column()), (Some(2), Some(1)));
    }

    #[test]
    fn impossible_values_are_rejected_where_they_stand() {
        let e = err("[plans.free]\nrate = \"10/s\"\nburst = 2\n[[routes]]\npath = \"/x\"\ncost = 5\n");
        assert_eq!(e.key(), "routes[0].cost");
        assert_eq!(e.line(), Some(6));
        let e = err("[tenants.a]\nplan = \"gold\"\n");
        assert_eq!(e.kind(), Kind::UnknownReference);
        assert_eq!((e.key(), e.line()), ("tenants.a.plan", Some(2)));
        let e = err("[[routes]]\npath = \"/a/{id}\"\n[[routes]]\npath = \"/a/{other}\"\n");
        assert_eq!(e.kind(), Kind::Conflict);
        assert_eq!((e.key(), e.line()), ("routes[1].path", Some(4)));
        let e = err("[plans.p.quotas.requests]\nlimit = 0\nperiod = \"day\"\n");
        assert_eq!((e.key(), e.line()), ("plans.p.quotas.requests.limit", Some(2)));
        let e = err("[plans.p]\nquotas.widgets = { limit = 5, period = \"day\" }\n");
        assert_eq!(e.key(), "plans.p.quotas.widgets");
        assert_eq!(e.line(), Some(2));
    }

    #[test]
    fn type_errors_and_syntax_errors_have_positions() {
        let e = err("[plans.free]\nburst = \"many\"\n");
        assert_eq!(e.key(), "plans.free.burst");
        assert_eq!(e.line(), Some(2));
        let e = err("[plans.free\nrate = 1\n");
        assert_eq!(e.kind(), Kind::Syntax);
        assert_eq!(e.line(), Some(1));
    }

    /// The key path and line of the error `text` gives.
    fn at(text: &str) -> (String, Option<usize>) {
        let e = err(text);
        (e.key().to_owned(), e.line())
    }

    /// A minute quota (tokens per minute): taken; with an anchor day, on a spend cap or where
    /// the fleet's clocks may differ by more than a store keeps an ended minute (a tenth of
    /// `reservation_expiry` past 10 minutes), refused by key and line.
    #[test]
    fn a_minute_quota_needs_clocks_within_what_a_store_keeps_of_an_ended_minute() {
        let plan =
            "[meters.tokens]\n[plans.p]\nquotas.tokens = { limit = 90000, period = \"minute\", mode = \"soft\" }\n";
        let c = parse(plan).unwrap();
        assert_eq!(c.plans()[&PlanId::from("p")].quotas[&MeterId::from("tokens")].period(), Period::Minute);
        let e = err(&format!("{plan}[limits]\nidle_timeout = \"1h\"\n"));
        assert_eq!((e.key(), e.line()), ("plans.p.quotas.tokens.period", Some(3)), "{e}");
        assert!(e.to_string().contains("100 minutes or less"), "{e}");
        assert!(parse(&format!("{plan}[limits]\nidle_timeout = \"50m\"\n")).is_ok());
        let tenant = "[meters.tokens]\n[plans.p]\n[tenants.t]\nplan = \"p\"\noverrides.quotas.tokens = { limit = 5, period = \"minute\", mode = \"soft\" }\n[limits]\nreservation_expiry = \"2h\"\n";
        assert_eq!(err(tenant).key(), "tenants.t.overrides.quotas.tokens.period");
        let e = err("[meters.tokens]\n[plans.p]\nquotas.tokens = { limit = 5, period = \"minute\", anchor_day = 3 }\n");
        assert_eq!(e.key(), "plans.p.quotas.tokens.anchor_day");
        let e = err("[billing]\ncurrency = \"usd\"\n[plans.p]\nspend = { limit = \"1.00\", period = \"minute\" }\n");
        assert_eq!(e.key(), "plans.p.spend.period");
    }

    /// `limits.reservation_expiry`: 30 minutes by default, or twice an `idle_timeout` that
    /// asks more; one under twice the idle timeout, under 5 minutes or over 30 days is refused
    /// with its line. A tenth of it is the clock skew tolerated.
    #[test]
    fn a_reservation_expiry_outlasts_twice_the_idle_timeout() {
        let c = parse("[plans.p]\n").unwrap();
        assert_eq!(c.limits.reservation_expiry, Duration::from_secs(1800));
        assert_eq!(c.limits.clock_skew(), Duration::from_secs(180));
        let c = parse("[plans.p]\n[limits]\nidle_timeout = \"1h\"\n").unwrap();
        assert_eq!(c.limits.reservation_expiry, Duration::from_secs(7200));
        assert_eq!(at("[limits]\nreservation_expiry = \"20m\"\n"), ("limits.reservation_expiry".to_owned(), Some(2)));
        assert_eq!(at("[limits]\nreservation_expiry = \"4m\"\nidle_timeout = \"1m\"\n").0, "limits.reservation_expiry");
        assert_eq!(at("[limits]\nreservation_expiry = \"31d\"\n").0, "limits.reservation_expiry");
        assert!(parse("[plans.p]\n[limits]\nreservation_expiry = \"5m\"\nidle_timeout = \"2m\"\n").is_ok());
    }

    #[test]
    fn tenant_names_follow_the_tenant_id_grammar() {
        let ok = parse("[plans.p]\n[tenants.\"sub|1234\"]\nplan = \"p\"\n").unwrap();
        assert_eq!(ok.tenants()[0].id().as_str(), "sub|1234");
        let e = err("[plans.p]\n[tenants.\"a b\"]\nplan = \"p\"\n");
        assert_eq!(e.kind(), Kind::InvalidValue);
        assert_eq!((e.key(), e.line(), e.column()), ("tenants.a b", Some(2), Some(1)));
        let long = "x".repeat(129);
        let e = err(&format!("[plans.p]\n\n[tenants.{long}]\nplan = \"p\"\n"));
        assert_eq!((e.key(), e.line()), (format!("tenants.{long}").as_str(), Some(3)));
        assert!(parse(&format!("[plans.p]\n[tenants.{}]\nplan = \"p\"\n", "x".repeat(128))).is_ok());
        // Plans and meters keep the stricter name grammar.
        assert_eq!(at("[plans.\"a|b\"]\n"), ("plans.a|b".to_owned(), Some(1)));
    }

    #[test]
    fn an_empty_event_name_is_rejected() {
        assert_eq!(at("[meters.tokens]\nevent_name = \"\"\n"), ("meters.tokens.event_name".to_owned(), Some(2)));
    }

    #[test]
    fn grace_stays_within_the_billing_horizon() {
        assert_eq!(at("[usage]\ngrace = \"36days\"\n"), ("usage.grace".to_owned(), Some(2)));
        assert_eq!(at("[usage]\ngrace = \"35days 1s\"\n"), ("usage.grace".to_owned(), Some(2)));
        assert_eq!(parse("[usage]\ngrace = \"35days\"\n").unwrap().usage().grace, Duration::from_secs(35 * 86_400));
    }

    #[test]
    fn stored_responses_fit_their_store() {
        // A window's half of the store must hold one response of the longest body, with 8 KiB
        // of headers.
        assert_eq!(
            at("[limits]\nidempotency_max_body = 1000\nidempotency_store_bytes = 18383\n"),
            ("limits.idempotency_store_bytes".to_owned(), Some(3))
        );
        assert!(parse("[limits]\nidempotency_max_body = 1000\nidempotency_store_bytes = 18384\n").is_ok());
        assert_eq!(
            at("[limits]\nidempotency_store_bytes = 0\n"),
            ("limits.idempotency_store_bytes".to_owned(), Some(2))
        );
        assert_eq!(
            at("[limits]\nidempotency_buffer_bytes = 0\n"),
            ("limits.idempotency_buffer_bytes".to_owned(), Some(2))
        );
        // DynamoDB: an item holds 400 KB; the window's half is split in 16 counters.
        let dynamo = "[store]\nkind = \"dynamodb\"\ntable = \"t\"\n";
        assert_eq!(
            at(&format!("{dynamo}[limits]\nidempotency_max_body = 350001\nidempotency_store_bytes = 100000000\n")),
            ("limits.idempotency_max_body".to_owned(), Some(5))
        );
        assert_eq!(
            at(&format!("{dynamo}[limits]\nidempotency_max_body = 1000\nidempotency_store_bytes = 294143\n")),
            ("limits.idempotency_store_bytes".to_owned(), Some(6))
        );
        assert!(parse(&format!("{dynamo}[limits]\nidempotency_max_body = 350000\n")).is_ok());
    }

    #[test]
    fn an_empty_billable_list_is_rejected() {
        let e = err("[usage]\nbillable = []\n");
        assert_eq!((e.kind(), e.key(), e.line()), (Kind::InvalidValue, "usage.billable", Some(2)));
    }

    #[test]
    fn only_standard_methods_are_accepted() {
        assert_eq!(at("[[routes]]\nmethod = \"GETT\"\npath = \"/x\"\n"), ("routes[0].method".to_owned(), Some(2)));
        assert_eq!(
            at("[limits]\nidempotency_methods = [\"POST\", \"GETT\"]\n"),
            ("limits.idempotency_methods[1]".to_owned(), Some(2))
        );
        assert_eq!(
            at("[limits]\nidempotency_methods = [\"*\"]\n"),
            ("limits.idempotency_methods[0]".to_owned(), Some(2))
        );
        let c = parse("[[routes]]\nmethod = \"patch\"\npath = \"/a\"\n[[routes]]\nmethod = \"*\"\npath = \"/b\"\n")
            .unwrap();
        assert_eq!(c.routes()[0].method(), Some(&http::Method::PATCH));
        assert_eq!(c.routes()[1].method(), None);
        for m in ["get", "HEAD", "Post", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"] {
            assert!(parse(&format!("[limits]\nidempotency_methods = [\"{m}\"]\n")).is_ok(), "{m}");
        }
    }

    #[test]
    fn route_paths_without_empty_segments_or_repeated_parameters() {
        for path in ["/a//b", "/a/", "//", "/a/{id}/b/{id}", "/a/{id}/{*id}"] {
            let text = format!("[[routes]]\nmethod = \"GET\"\npath = \"{path}\"\n");
            assert_eq!(at(&text), ("routes[0].path".to_owned(), Some(3)), "{path}");
        }
        assert!(parse("[[routes]]\npath = \"/\"\n[[routes]]\npath = \"/a/{id}/b/{other}\"\n").is_ok());
    }

    #[test]
    fn rates_with_stray_spaces_or_underscores_are_rejected() {
        for rate in ["2 / s", "_2/s", " 2/s", "2/s ", "2_/s", "6__000/min"] {
            let text = format!("[plans.a]\nrate = \"{rate}\"\n");
            assert_eq!(at(&text), ("plans.a.rate".to_owned(), Some(2)), "{rate}");
        }
        let c = parse("[plans.a]\nrate = \"6_000/min\"\n[plans.b]\nrate = \"2/s\"\n").unwrap();
        assert_eq!(c.plan(&"a".into()).unwrap().rate().unwrap().count().get(), 6000);
    }

    #[test]
    fn duplicate_keys_are_named() {
        let e = err("[plans.a]\nrate=\"1/s\"\nrate=\"2/s\"\n");
        assert_eq!((e.key(), e.line(), e.column()), ("plans.a.rate", Some(3), Some(1)));
        assert!(e.message().contains("duplicate key"), "{e}");
        assert_eq!(at("[plans.a]\n[plans.b]\n[plans.a]\n"), ("plans.a".to_owned(), Some(3)));
        assert_eq!(
            at("[[routes]]\npath = \"/a\"\n[[routes]]\npath = \"/b\"\npath = \"/c\"\n"),
            ("routes[1].path".to_owned(), Some(5))
        );
        assert_eq!(
            at("[plans.a]\nquotas.x.limit = 1\nquotas.y.limit = 2\nquotas.x.limit = 3\n"),
            ("plans.a.quotas.x.limit".to_owned(), Some(4))
        );
        assert_eq!(
            at("[plans.a]\nquotas.requests = { limit = 1, period = \"day\", limit = 2 }\n"),
            ("plans.a.quotas.requests.limit".to_owned(), Some(2))
        );
        assert_eq!(at("[tenants.\"a b\"]\nplan = \"p\"\n\"plan\" = \"q\"\n"), ("tenants.a b.plan".to_owned(), Some(3)));
    }

    #[test]
    fn an_empty_document_is_rejected() {
        for text in ["", "\n  \n", "# nothing yet\n\n# still nothing\n"] {
            let e = err(text);
            assert_eq!(e.kind(), Kind::InvalidValue);
            assert_eq!((e.key(), e.line(), e.column()), ("", Some(1), Some(1)));
            assert!(e.message().contains("no plans"), "{e}");
        }
        // Any key at all makes a document: a configuration without plans stays valid.
        assert!(parse("[limits]\n").is_ok());
        assert!(parse("[limits]\nmax_tenants = 5\n").unwrap().plans().is_empty());
    }

    #[test]
    fn new_settings_have_defaults() {
        let c = parse("[limits]\n").unwrap();
        assert_eq!(c.usage().shutdown_timeout, Duration::from_secs(10));
        assert_eq!(c.limits().directory_ttl, Duration::from_secs(60));
        assert_eq!(c.limits().negative_ttl, Duration::from_secs(10));
        assert_eq!(c.limits().negative_capacity, 100_000);
        let c = parse(
            "[limits]\ndirectory_ttl = \"5m\"\nnegative_ttl = \"1s\"\nnegative_capacity = 7\n\
             [usage]\nshutdown_timeout = \"30s\"\n",
        )
        .unwrap();
        assert_eq!(c.usage().shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.limits().directory_ttl, Duration::from_secs(300));
        assert_eq!(c.limits().negative_ttl, Duration::from_secs(1));
        assert_eq!(c.limits().negative_capacity, 7);
    }

    #[test]
    fn new_settings_reject_bad_values() {
        assert_eq!(at("[usage]\nshutdown_timeout = \"soon\"\n"), ("usage.shutdown_timeout".to_owned(), Some(2)));
        assert_eq!(at("[limits]\n\ndirectory_ttl = \"0s\"\n"), ("limits.directory_ttl".to_owned(), Some(3)));
        assert_eq!(at("[limits]\nnegative_ttl = \"10\"\n"), ("limits.negative_ttl".to_owned(), Some(2)));
        assert_eq!(at("[limits]\nhold_timeout = \"2d\"\n"), ("limits.hold_timeout".to_owned(), Some(2)));
        let e = err("[limits]\nnegative_capacity = 0\n");
        assert_eq!((e.kind(), e.key(), e.line()), (Kind::InvalidValue, "limits.negative_capacity", Some(2)));
        assert_eq!(at("[limits]\nnegative_capacity = -3\n"), ("limits.negative_capacity".to_owned(), Some(2)));
    }

    #[test]
    fn fleet_rates_refuse_what_they_cannot_be() {
        // An unknown scope; a fleet scope without a rate; a fleet size of 0.
        let e = err("[plans.p]\nrate = \"10/s\"\nrate_scope = \"cluster\"\n");
        assert_eq!((e.key(), e.line()), ("plans.p.rate_scope", Some(3)), "{e}");
        assert_eq!(at("[plans.p]\nrate_scope = \"fleet\"\n"), ("plans.p.rate_scope".to_owned(), Some(2)));
        assert_eq!(at("[limits]\nfleet_size_hint = 0\n"), ("limits.fleet_size_hint".to_owned(), Some(2)));
        // The anonymous plan keeps its rate per client address: never for the fleet.
        let e = err("[identify]\nunknown = \"anonymous\"\nanonymous_plan = \"free\"\n\
             [plans.free]\nrate = \"10/s\"\nrate_scope = \"fleet\"\n");
        assert_eq!((e.key(), e.line()), ("plans.free.rate_scope", Some(6)), "{e}");
        // An override: an unknown scope, and a fleet scope the merged plan has no rate for.
        let e =
            err("[plans.p]\n[tenants.t]\nplan = \"p\"\nkeys = [\"k\"]\n[tenants.t.overrides]\nrate_scope = \"all\"\n");
        assert_eq!(e.key(), "tenants.t.overrides.rate_scope", "{e}");
        let e = err(
            "[plans.p]\n[tenants.t]\nplan = \"p\"\nkeys = [\"k\"]\n[tenants.t.overrides]\nrate_scope = \"fleet\"\n",
        );
        assert!(e.key().starts_with("tenants.t.overrides"), "{e}");
        // A fleet concurrency: an unknown scope, one without `concurrency`, a TTL too short to
        // renew.
        let e = err("[plans.p]\nconcurrency = 3\nconcurrency_scope = \"all\"\n");
        assert_eq!((e.key(), e.line()), ("plans.p.concurrency_scope", Some(3)), "{e}");
        assert_eq!(at("[plans.p]\nconcurrency_scope = \"fleet\"\n"), ("plans.p.concurrency_scope".to_owned(), Some(2)));
        assert_eq!(at("[limits]\nplace_ttl = \"5s\"\n"), ("limits.place_ttl".to_owned(), Some(2)));
        // A queue shorter than one call's time, or past a minute (issue 85); unset, it is 2 s
        // or the store's timeout if longer.
        let e = err("[usage]\nstore_timeout = \"1s\"\nqueue_timeout = \"500ms\"\n");
        assert_eq!((e.key(), e.line()), ("usage.queue_timeout", Some(3)), "{e}");
        assert_eq!(at("[usage]\nqueue_timeout = \"61s\"\n"), ("usage.queue_timeout".to_owned(), Some(2)));
        let queue = |toml: &str| parse(&format!("[plans.p]\n{toml}")).unwrap().usage.queue_timeout;
        assert_eq!(queue(""), std::time::Duration::from_secs(2));
        assert_eq!(queue("[usage]\nstore_timeout = \"5s\"\n"), std::time::Duration::from_secs(5));
        assert_eq!(queue("[usage]\nqueue_timeout = \"250ms\"\n"), std::time::Duration::from_millis(250));
        // The node's budget of usage views (issue 86, item 7): a rate, 50/s unless set.
        assert_eq!(at("[usage]\nview_refresh_rate = \"fast\"\n"), ("usage.view_refresh_rate".to_owned(), Some(2)));
        assert_eq!(at("[usage]\nview_refresh_rate = \"0/s\"\n"), ("usage.view_refresh_rate".to_owned(), Some(2)));
        let budget = |toml: &str| parse(&format!("[plans.p]\n{toml}")).unwrap().usage.view_refresh_rate.to_string();
        assert_eq!(budget(""), "50/s");
        assert_eq!(budget("[usage]\nview_refresh_rate = \"600/min\"\n"), "600/min");
        // A TTL a renewal cannot land within, given the store calls' time limit: refused where
        // a plan counts its concurrency for the fleet, accepted where none does.
        let slow = "[usage]\nstore_timeout = \"5s\"\n[limits]\nplace_ttl = \"30s\"\nfleet_size_hint = 2\n";
        let e = err(&format!("[plans.p]\nconcurrency = 3\nconcurrency_scope = \"fleet\"\n{slow}"));
        assert_eq!((e.key(), e.line()), ("limits.place_ttl", Some(7)), "{e}");
        assert!(e.to_string().contains("33s"), "{e}");
        assert!(parse(&format!("[plans.p]\nconcurrency = 3\n{slow}")).is_ok());
        // Without `place_ttl` in the file, the timeout that makes the default too short.
        let e = err("[usage]\nstore_timeout = \"5s\"\n[limits]\nfleet_size_hint = 2\n[plans.p]\nconcurrency = 3\n\
             concurrency_scope = \"fleet\"\n");
        assert_eq!((e.key(), e.line()), ("usage.store_timeout", Some(2)), "{e}");
        // A fleet scope that fails open needs the fleet's size: each node's share while the
        // store is down (issue 53); refused where the file leaves it out, naming the plan's
        // scope and the missing key; accepted with it, or failing closed.
        for (plan, key, line) in [
            ("rate = \"10/s\"\nrate_scope = \"fleet\"\n", "plans.p.rate_scope", 3),
            ("concurrency = 3\nconcurrency_scope = \"fleet\"\n", "plans.p.concurrency_scope", 3),
        ] {
            let e = err(&format!("[plans.p]\n{plan}"));
            assert_eq!((e.key(), e.line()), (key, Some(line)), "{e}");
            assert!(e.to_string().contains("limits.fleet_size_hint"), "{e}");
            assert!(parse(&format!("[limits]\nfleet_size_hint = 3\n[plans.p]\n{plan}")).is_ok());
            assert!(parse(&format!("[plans.p]\non_store_error = \"fail-closed\"\n{plan}")).is_ok());
            let closed = format!("[usage]\non_store_error = \"fail-closed\"\n[plans.p]\n{plan}");
            assert!(parse(&closed).is_ok(), "fail-closed for every plan");
            let open =
                format!("[usage]\non_store_error = \"fail-closed\"\n[plans.p]\non_store_error = \"fail-open\"\n{plan}");
            assert!(err(&open).to_string().contains("limits.fleet_size_hint"));
        }
        // A tenant's override that makes the scope the fleet's: in the file, and through the
        // directory (`tollgate tenants set-override`).
        let e = err("[plans.p]\nrate = \"10/s\"\n[tenants.t]\nplan = \"p\"\nkeys = [\"k\"]\n[tenants.t.overrides]\nrate_scope = \"fleet\"\n");
        assert_eq!(e.key(), "tenants.t.overrides.rate_scope", "{e}");
        assert!(e.to_string().contains("limits.fleet_size_hint"), "{e}");
        let c = crate::Config::from_toml_str("[plans.p]\nrate = \"10/s\"\n").unwrap();
        let o = crate::config::PlanOverride { rate_scope: Some(crate::config::Scope::Fleet), ..Default::default() };
        let why = c.check_override(&"p".into(), &o).unwrap_err();
        assert!(why.contains("limits.fleet_size_hint"), "{why}");
        let c = crate::Config::from_toml_str("[limits]\nfleet_size_hint = 2\n[plans.p]\nrate = \"10/s\"\n").unwrap();
        assert!(c.check_override(&"p".into(), &o).is_ok());
        // The anonymous plan keeps its requests in flight per client address: no fleet scope.
        let e = err("[identify]\nunknown = \"anonymous\"\nanonymous_plan = \"free\"\n\
             [plans.free]\nconcurrency = 2\nconcurrency_scope = \"fleet\"\n");
        assert!(e.key().starts_with("plans.free.concurrency") || e.key() == "identify.anonymous_plan", "{e}");
        let e = err("[store]\nkind = \"sqlite\"\npath = \"t.db\"\n[store.places]\nkind = \"memory\"\n");
        assert_eq!(e.key(), "store.places.kind", "{e}");
        // A fleet rate kept in one process's memory beside a SQLite quota store (the
        // processes sharing the file would each keep their own).
        let e = err("[store]\nkind = \"sqlite\"\npath = \"t.db\"\n[store.rate]\nkind = \"memory\"\n");
        assert_eq!(e.key(), "store.rate.kind", "{e}");
        // Accepted: a plan's fleet rate, and a tenant's override back to the node.
        let c = crate::Config::from_toml_str(
            "[plans.p]\nrate = \"10/s\"\nrate_scope = \"fleet\"\n[limits]\nfleet_size_hint = 3\n",
        )
        .unwrap();
        assert_eq!(c.plans()[&crate::base::PlanId::from("p")].rate_scope(), crate::config::Scope::Fleet);
        assert_eq!(c.limits().fleet_size_hint, 3);
    }

    const TOKENS: &str = "[meters.tokens]\n[meters.images]\n";

    const BILLING: &str = "[billing]\ncurrency = \"usd\"\n";

    #[test]
    fn prices_and_spend_caps_are_checked_with_their_line_and_key() {
        // A price that is not a decimal, or negative; a float is not a decimal string.
        let e = err(&format!("{BILLING}[meters.tokens]\nprice = \"two cents\"\n"));
        assert_eq!((e.key(), e.line()), ("meters.tokens.price", Some(4)));
        assert!(e.to_string().contains("decimal"), "{e}");
        let e = err(&format!("{BILLING}[meters.tokens]\nprice = \"-0.01\"\n"));
        assert_eq!((e.key(), e.line()), ("meters.tokens.price", Some(4)));
        assert!(e.to_string().contains("negative"), "{e}");
        let e = err(&format!("{BILLING}[meters.tokens]\nprice = 0.01\n"));
        assert_eq!((e.key(), e.line()), ("meters.tokens.price", Some(4)), "money is never a float");
        let e = err(&format!("{BILLING}[meters.tokens]\n[plans.p]\nprices.tokens = \"1e-3\"\n"));
        assert_eq!((e.key(), e.line()), ("plans.p.prices.tokens", Some(5)));
        // Money without a currency.
        let e = err("[meters.tokens]\nprice = \"0.01\"\n");
        assert_eq!((e.key(), e.line()), ("meters.tokens.price", Some(2)));
        assert!(e.to_string().contains("[billing]"), "{e}");
        let e = err("[plans.p]\nspend = { limit = \"50.00\" }\n");
        assert_eq!((e.key(), e.line()), ("plans.p.spend", Some(2)));
        assert!(e.to_string().contains("currency"), "{e}");
        // A max_limit below the limit; a limit that is not an amount.
        let e = err(&format!("{BILLING}[plans.p]\nspend = {{ limit = \"50.00\", max_limit = \"20.00\" }}\n"));
        assert_eq!((e.key(), e.line()), ("plans.p.spend.max_limit", Some(4)));
        let e = err(&format!("{BILLING}[plans.p]\nspend = {{ limit = \"0.0000000001\" }}\n"));
        assert_eq!(e.key(), "plans.p.spend.limit");
        let e = err(&format!("{BILLING}[plans.p]\nspend = {{ limit = \"2000000000\" }}\n"));
        assert_eq!(e.key(), "plans.p.spend.limit");
        let e = err(&format!("{BILLING}[plans.p]\nspend = {{ limit = \"5\", period = \"prepaid\" }}\n"));
        assert_eq!(e.key(), "plans.p.spend.period");
        // The reserved meter.
        let e = err(&format!("{BILLING}[meters.spend]\n"));
        assert_eq!((e.key(), e.line()), ("meters.spend", Some(3)));
        assert!(e.to_string().contains("reserved"), "{e}");
        let e = err("[meters.spend]\n");
        assert_eq!(e.key(), "meters.spend", "reserved with or without [billing]");
        let e = err(&format!("{BILLING}[plans.p]\nquotas.spend = {{ limit = 5, period = \"day\" }}\n"));
        assert_eq!(e.key(), "plans.p.quotas.spend");
        let e = err("[billing]\ncurrency = \"USD\"\n");
        assert_eq!((e.key(), e.line()), ("billing.currency", Some(2)));
        // A hard cap needs no route that charges the spend meter; and every price is exact.
        let c = parse(&format!(
            "{BILLING}[meters.tokens]\nprice = \"0.00000015\"\n[plans.p]\nprices.tokens = \"0.0000001\"\n\
             spend = {{ limit = \"50.00\", max_limit = \"500.00\" }}\n"
        ))
        .unwrap();
        let plan = &c.plans()[&crate::base::PlanId::from("p")];
        assert_eq!(plan.spend().unwrap().limit().get(), 50_000_000_000);
        assert_eq!(plan.spend_max(), Some(500_000_000_000));
        assert_eq!(plan.prices()[&MeterId::from("tokens")].to_string(), "0.0000001");
        let spend = c.meters().iter().find(|m| m.id().as_str() == "spend").unwrap();
        assert!(!spend.exported(), "money is never exported as units");
    }

    #[test]
    fn a_plans_recharge_is_checked_with_its_line_and_key() {
        const STRIPE: &str =
            "[stripe]\n[stripe.credits]\nmeter = \"credits\"\n[stripe.credits.prices]\nprice_pack = 1000\n";
        const ROUTE: &str = "[[routes]]\npath = \"/g\"\nreports = [\"credits\", \"tokens\"]\n";
        let plan = |recharge: &str| {
            format!(
                "{BILLING}[meters.credits]\n[meters.tokens]\n[plans.p]\nquotas.credits = {{ period = \"prepaid\" }}\n\
                 quotas.tokens = {{ limit = 5, period = \"day\" }}\n[plans.p.recharge.credits]\n{recharge}{STRIPE}{ROUTE}"
            )
        };
        let good = "price = \"price_pack\"\nbelow = 1000\nto = 5000\nmonthly_limit = \"200.00\"\n";
        let c = parse(&plan(good)).unwrap();
        let r = c.plans()[&crate::base::PlanId::from("p")].recharge(&MeterId::from("credits")).unwrap().clone();
        assert_eq!(
            (r.price.as_str(), r.pack_units, r.below, r.to, r.monthly_limit),
            ("price_pack", 1000, 1000, 5000, 20_000)
        );
        // `to` at or under `below` (line 9: `to`).
        let e = err(&plan("price = \"price_pack\"\nbelow = 1000\nto = 1000\nmonthly_limit = \"200.00\"\n"));
        assert_eq!((e.key(), e.line()), ("plans.p.recharge.credits.to", Some(11)), "{e}");
        assert!(e.to_string().contains("more than `below`"), "{e}");
        // A price that is not a credit price.
        let e = err(&plan("price = \"price_other\"\nbelow = 1000\nto = 5000\nmonthly_limit = \"200.00\"\n"));
        assert_eq!((e.key(), e.line()), ("plans.p.recharge.credits.price", Some(9)), "{e}");
        assert!(e.to_string().contains("[stripe.credits]"), "{e}");
        // A negative, a non-decimal monthly limit, and one finer than a cent.
        for bad in ["\"-5.00\"", "\"lots\"", "200", "\"200.001\""] {
            let e = err(&plan(&format!("price = \"price_pack\"\nbelow = 1000\nto = 5000\nmonthly_limit = {bad}\n")));
            assert_eq!(e.key(), "plans.p.recharge.credits.monthly_limit", "{bad}: {e}");
            assert_eq!(e.line(), Some(12), "{bad}: {e}");
        }
        // Zero units.
        let e = err(&plan("price = \"price_pack\"\nbelow = 0\nto = 5000\nmonthly_limit = \"200.00\"\n"));
        assert_eq!(e.key(), "plans.p.recharge.credits.below", "{e}");
        // A meter the plan does not hold prepaid.
        let e = err(&plan("price = \"price_pack\"\nbelow = 1\nto = 5\nmonthly_limit = \"2.00\"\n")
            .replace("recharge.credits]", "recharge.tokens]"));
        assert_eq!((e.key(), e.line()), ("plans.p.recharge.tokens", Some(8)), "{e}");
        assert!(e.to_string().contains("prepaid"), "{e}");
        // Without [stripe].
        let e = err(&plan(good).replace(STRIPE, ""));
        assert_eq!((e.key(), e.line()), ("plans.p.recharge.credits", Some(8)), "{e}");
        assert!(e.to_string().contains("[stripe]"), "{e}");
        // Without [billing].
        let e = err(&plan(good).replace(BILLING, ""));
        assert_eq!(e.key(), "plans.p.recharge.credits.monthly_limit", "{e}");
        assert!(e.to_string().contains("currency"), "{e}");
        // An unknown key.
        let e = err(&plan(&format!("{good}threshold = 5\n")));
        assert!(e.to_string().contains("threshold"), "{e}");
        // A recharge that buys more than a balance holds (2^50): packs of 10^15 units to
        // 2 × 10^15 would charge the card and grant nothing.
        let huge = plan("price = \"price_pack\"\nbelow = 1000\nto = 2000000000000000\nmonthly_limit = \"200.00\"\n")
            .replace("price_pack = 1000\n", "price_pack = 1000000000000000\n");
        let e = err(&huge);
        assert_eq!((e.key(), e.line()), ("plans.p.recharge.credits.to", Some(11)), "{e}");
        assert!(e.to_string().contains("2^50"), "{e}");
        let pack = plan(good).replace("price_pack = 1000\n", "price_pack = 1125899906842624\n");
        assert_eq!(err(&pack).key(), "plans.p.recharge.credits.to", "a pack past a balance");
        // A lookup key (an invoice item needs a price id), mapped in [stripe.credits.prices].
        let e = err(&plan("price = \"credits_1000\"\nbelow = 1000\nto = 5000\nmonthly_limit = \"200.00\"\n")
            .replace("price_pack = 1000\n", "credits_1000 = 1000\n"));
        assert_eq!((e.key(), e.line()), ("plans.p.recharge.credits.price", Some(9)), "{e}");
        assert!(e.to_string().contains("price id"), "{e}");
        // A zero-decimal currency: yen are whole.
        let yen = plan(good).replace("currency = \"usd\"", "currency = \"jpy\"");
        let c = parse(&yen).unwrap();
        assert_eq!(
            c.plans()[&crate::base::PlanId::from("p")].recharge(&MeterId::from("credits")).unwrap().monthly_limit,
            200
        );
    }

    #[test]
    fn routes_declare_the_meters_their_handler_reports() {
        let c = parse(&format!("{TOKENS}[[routes]]\npath = \"/g\"\nreports = [\"tokens\", \"images\"]\n")).unwrap();
        assert_eq!(c.routes()[0].reports(), [MeterId::from("tokens"), MeterId::from("images")]);
        let c = parse(&format!("{TOKENS}[[routes]]\npath = \"/g\"\n")).unwrap();
        assert!(c.routes()[0].reports().is_empty());

        let e = err(&format!("{TOKENS}[[routes]]\npath = \"/g\"\n\nreports = [\"tokens\", \"widgets\"]\n"));
        assert_eq!(e.kind(), Kind::UnknownReference);
        assert_eq!((e.key(), e.line()), ("routes[0].reports[1]", Some(6)));
        let e = err(&format!("{TOKENS}[[routes]]\npath = \"/g\"\nreports = [\"tokens\", \"tokens\"]\n"));
        assert_eq!((e.key(), e.line()), ("routes[0].reports[1]", Some(5)));
        let e = err(&format!(
            "{TOKENS}[[routes]]\npath = \"/g\"\nmeter = \"tokens\"\nreports = [\"images\", \"tokens\"]\n"
        ));
        assert_eq!((e.key(), e.line()), ("routes[0].reports[1]", Some(6)));
        // A route without a meter charges the default meter: it cannot report it too.
        let e = err("[[routes]]\npath = \"/g\"\nreports = [\"requests\"]\n");
        assert_eq!((e.key(), e.line()), ("routes[0].reports[0]", Some(3)));
    }

    #[test]
    fn a_route_holds_a_limited_meter_it_reports_with_sound_estimates() {
        use crate::config::{HoldEstimate, HoldSettle};
        let plan = "[plans.p]\nquotas.tokens = { limit = 500, period = \"day\" }\n";
        let route = |hold: &str| format!("{TOKENS}{plan}[[routes]]\npath = \"/g\"\nreports = [\"tokens\"]\n{hold}");
        let c = parse(&route("hold.tokens = 64\n")).unwrap();
        let h = c.routes()[0].hold().unwrap();
        assert_eq!(
            (&h.estimate, h.settle, h.overrun),
            (&HoldEstimate::Units(64), HoldSettle::Actual, crate::Overrun::Debt)
        );
        let c = parse(&route(
            "hold.tokens = { header = \"x-max-tokens\", default = 8, max = 32 }\nactual_header = \"x-usage-tokens\"\noverrun = \"refuse\"\nhold_timeout = \"2m\"\n",
        ))
        .unwrap();
        let h = c.routes()[0].hold().unwrap();
        assert!(matches!(&h.estimate, HoldEstimate::Header { default: 8, max: 32, .. }));
        assert_eq!(h.actual_header.as_ref().map(|n| n.as_str()), Some("x-usage-tokens"));
        assert_eq!((h.overrun, h.timeout), (crate::Overrun::Refuse, Some(Duration::from_secs(120))));
        // Each bad input, named with its line.
        let at = |hold: &str| {
            let e = err(&route(hold));
            (e.key().to_owned(), e.line(), e.message().to_owned())
        };
        assert_eq!(at("hold.tokens = 0\n").0, "routes[0].hold.tokens");
        assert_eq!(at("hold.tokens = -5\n").0, "routes[0].hold.tokens");
        let (key, line, _) = at("hold.tokens = { header = \"x-max\", default = 64, max = 8 }\n");
        assert_eq!((key.as_str(), line), ("routes[0].hold.tokens.max", Some(8)));
        assert_eq!(
            at("hold.tokens = { header = \"x-max\", default = 0, max = 8 }\n").0,
            "routes[0].hold.tokens.default"
        );
        assert_eq!(at("hold.tokens = 5\nsettle = \"later\"\n").0, "routes[0].settle");
        assert_eq!(at("hold.tokens = 5\noverrun = \"maybe\"\n").0, "routes[0].overrun");
        let (key, _, message) = at("hold.tokens = 5\nsettle = \"estimate\"\nactual_header = \"x-used\"\n");
        assert_eq!(key, "routes[0].actual_header", "{message}");
        assert_eq!(at("overrun = \"refuse\"\n").0, "routes[0].overrun");
        assert_eq!(at("hold.tokens = 5\nhold_timeout = \"10ms\"\n").0, "routes[0].hold_timeout");
        // A day at most: a hold sees at most one roll of its period.
        assert_eq!(at("hold.tokens = 5\nhold_timeout = \"25h\"\n").0, "routes[0].hold_timeout");
        // Held, the meter must be one the route reports and a plan limits.
        let e = err(&format!("{TOKENS}{plan}[[routes]]\npath = \"/g\"\nreports = [\"tokens\"]\nhold.images = 5\n"));
        assert_eq!((e.key(), e.line()), ("routes[0].hold.images", Some(8)));
        let soft = "[plans.p]\nquotas.tokens = { limit = 500, period = \"day\", mode = \"soft\" }\n";
        let e = err(&format!("{TOKENS}{soft}[[routes]]\npath = \"/g\"\nreports = [\"tokens\"]\nhold.tokens = 5\n"));
        assert_eq!(e.key(), "routes[0].hold.tokens");
        assert!(e.message().contains("no plan"), "{e}");
    }

    #[test]
    fn a_hard_quota_needs_a_route_that_charges_or_reports_its_meter() {
        let plan = "[plans.p]\nrate = \"1/s\"\nquotas.tokens = { limit = 5, period = \"day\" }\n";
        let e = err(&format!("{TOKENS}{plan}"));
        assert_eq!(e.kind(), Kind::InvalidValue);
        assert_eq!((e.key(), e.line()), ("plans.p.quotas.tokens", Some(5)));
        assert!(e.message().contains("reports"), "{e}");
        // Reported, charged by a route, or the default meter: each makes the quota reachable.
        assert!(parse(&format!("{TOKENS}{plan}[[routes]]\npath = \"/g\"\nreports = [\"tokens\"]\n")).is_ok());
        assert!(parse(&format!("{TOKENS}{plan}[[routes]]\npath = \"/g\"\nmeter = \"tokens\"\n")).is_ok());
        assert!(parse(&format!("{TOKENS}{plan}[usage]\ndefault_meter = \"tokens\"\n")).is_ok());
        // A soft quota only counts overage: it is allowed on any meter.
        assert!(parse(&format!(
            "{TOKENS}[plans.p]\nquotas.tokens = {{ limit = 5, period = \"day\", mode = \"soft\" }}\n"
        ))
        .is_ok());
        // `requests` is the default meter, so its quotas are always reachable...
        assert!(parse("[plans.p]\nquotas.requests = { limit = 5, period = \"day\" }\n").is_ok());
        // ...unless another meter is the default and no route charges `requests`.
        let e = err(&format!(
            "{TOKENS}[usage]\ndefault_meter = \"tokens\"\n[plans.p]\nquotas.requests = {{ limit = 5, period = \"day\" }}\n"
        ));
        assert_eq!((e.key(), e.line()), ("plans.p.quotas.requests", Some(6)));
    }

    #[test]
    fn paths_split_with_indices() {
        let segs: Vec<String> = split_path("routes[3].cost")
            .map(|s| match s {
                Segment::Key(k) => k.to_owned(),
                Segment::Index(i) => i.to_string(),
            })
            .collect();
        assert_eq!(segs, ["routes", "3", "cost"]);
    }
}

mod values {
    use super::*;
    use crate::base::{InvalidTenantId, Period, TenantId};
    use chrono::{TimeZone, Utc};

    fn ts(y: i32, m: u32, d: u32) -> i64 {
        Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap().timestamp()
    }

    #[test]
    fn rates_parse() {
        assert_eq!("100/s".parse::<Rate>().unwrap().interval(), Duration::from_millis(10));
        assert_eq!("6_000/min".parse::<Rate>().unwrap().count().get(), 6000);
        assert_eq!("1/day".parse::<Rate>().unwrap().per(), Duration::from_secs(86_400));
        assert_eq!("0/s".parse::<Rate>(), Err(RateError::Count));
        assert_eq!("10/week".parse::<Rate>(), Err(RateError::Unit));
        assert_eq!("10".parse::<Rate>(), Err(RateError::Format));
        assert_eq!("-3/s".parse::<Rate>(), Err(RateError::Count));
        // Underscores only between digits, and no spaces anywhere.
        assert_eq!("1_000_000/day".parse::<Rate>().unwrap().count().get(), 1_000_000);
        assert_eq!("_2/s".parse::<Rate>(), Err(RateError::Count));
        assert_eq!("2_/s".parse::<Rate>(), Err(RateError::Count));
        assert_eq!("6__000/min".parse::<Rate>(), Err(RateError::Count));
        assert_eq!("2 / s".parse::<Rate>(), Err(RateError::Format));
        assert_eq!(" 2/s".parse::<Rate>(), Err(RateError::Format));
        assert_eq!("2/s\n".parse::<Rate>(), Err(RateError::Format));
    }

    #[test]
    fn tenant_ids() {
        assert_eq!(TenantId::parse("sub|1234").unwrap().as_str(), "sub|1234");
        assert!(TenantId::is_valid("!~") && TenantId::is_valid(&"a".repeat(128)));
        assert_eq!(TenantId::parse(""), Err(InvalidTenantId::Empty));
        assert_eq!(TenantId::parse(&"a".repeat(129)), Err(InvalidTenantId::TooLong { len: 129 }));
        assert_eq!(TenantId::parse("a b"), Err(InvalidTenantId::Character { at: 1, found: ' ' }));
        assert_eq!(TenantId::parse("ab\t"), Err(InvalidTenantId::Character { at: 2, found: '\t' }));
        assert_eq!(TenantId::parse("café"), Err(InvalidTenantId::Character { at: 3, found: 'é' }));
        assert!(!TenantId::is_valid("a\u{7f}"));
        assert!(TenantId::parse("a b").unwrap_err().to_string().contains("128 visible ASCII"));
    }

    #[test]
    fn month_periods_follow_the_calendar() {
        let m = Period::Month { anchor_day: 1 };
        assert_eq!(m.bounds(ts(2026, 2, 14) + 5), (ts(2026, 2, 1), ts(2026, 3, 1)));
        assert_eq!(m.bounds(ts(2026, 12, 31)), (ts(2026, 12, 1), ts(2027, 1, 1)));
        let anchored = Period::Month { anchor_day: 31 };
        // February has no 31st: the period starts on its last day.
        assert_eq!(anchored.bounds(ts(2026, 3, 1)), (ts(2026, 2, 28), ts(2026, 3, 31)));
        assert_eq!(anchored.bounds(ts(2026, 1, 30)), (ts(2025, 12, 31), ts(2026, 1, 31)));
        let d = Period::Day;
        assert_eq!(d.bounds(ts(2024, 2, 29) + 86_399), (ts(2024, 2, 29), ts(2024, 3, 1)));
    }

    #[test]
    fn status_sets() {
        let s = StatusSet::default();
        assert!(s.contains(200) && s.contains(404) && !s.contains(500) && !s.contains(99));
        assert_eq!(format!("{s:?}"), "[100-499]");
    }
}

/// `reference.toml`: every key tollgate reads, each once at least, and nothing else.
mod reference {
    use std::collections::BTreeSet;

    use super::super::document::RawConfig;

    const REFERENCE: &str = include_str!("reference.toml");

    /// The roles a `[store]` section may hold a section of.
    const ROLES: [&str; 7] = ["quota", "usage", "directory", "idempotency", "rate", "places", "alerts"];

    /// Tables whose keys are names the user chose (a meter, a plan, a tenant, a quota's meter).
    const NAMED: [&str; 6] = ["meters", "plans", "tenants", "quotas", "endpoints", "versions"];

    /// The path of `key` under `path`: a user-chosen name is `*`, and a role's store section
    /// counts as `[store]` itself.
    fn child(path: &str, key: &str) -> String {
        let parent = path.rsplit('.').next().unwrap_or("");
        let key = if NAMED.contains(&parent) { "*" } else { key };
        match path {
            "" => key.to_owned(),
            "store" if ROLES.contains(&key) => path.to_owned(),
            p => format!("{p}.{key}"),
        }
    }

    /// Every field path serde knows of the raw document (absent keys are `null`): the keys
    /// tollgate reads. Maps of free-form values (`stripe.prices`) are values, not fields.
    fn fields(value: &serde_json::Value, path: &str, out: &mut BTreeSet<String>) {
        match value {
            serde_json::Value::Object(map)
                if !path.ends_with(".prices")
                    && !path.ends_with(".events")
                    && !path.ends_with(".subscription_status")
                    && !path.ends_with(".products") =>
            {
                for (k, v) in map {
                    let at = child(path, k);
                    out.insert(at.clone());
                    // An earlier version of a plan is a plan's table, its keys the plan's own.
                    if !path.ends_with(".versions") {
                        fields(v, &at, out);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| fields(v, path, out)),
            _ => {}
        }
    }

    /// Every key path the reference writes.
    fn written(value: &toml::Value, path: &str, out: &mut BTreeSet<String>) {
        match value {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let at = child(path, k);
                    out.insert(at.clone());
                    if !path.ends_with(".versions") {
                        written(v, &at, out);
                    }
                }
            }
            toml::Value::Array(items) => items.iter().for_each(|v| written(v, path, out)),
            _ => {}
        }
    }

    /// A file of the test's own in the system's temporary directory, holding `text`.
    #[allow(dead_code)]
    fn tempfile_in_target(name: &str, text: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn keys() -> (BTreeSet<String>, BTreeSet<String>) {
        // Every table denies unknown keys: each key of the reference is one tollgate reads.
        let raw: RawConfig = toml::from_str(REFERENCE).unwrap_or_else(|e| panic!("src/config/reference.toml: {e}"));
        let (mut all, mut shown) = (BTreeSet::new(), BTreeSet::new());
        fields(&serde_json::to_value(&raw).unwrap(), "", &mut all);
        written(&toml::Value::Table(toml::from_str(REFERENCE).unwrap()), "", &mut shown);
        (all, shown)
    }

    #[test]
    fn the_reference_names_every_key_tollgate_reads() {
        let (all, shown) = keys();
        let missing: Vec<&String> = all.difference(&shown).collect();
        assert!(missing.is_empty(), "src/config/reference.toml does not write {missing:?}");
        assert!(all.len() > 120, "{} keys", all.len());
    }

    /// The part of the guide under the heading that starts with `heading`, to the next heading
    /// of its level or above.
    fn section<'g>(guide: &'g str, heading: &str) -> &'g str {
        let start =
            guide.find(&format!("\n{heading}")).unwrap_or_else(|| panic!("docs/configuration.md has no `{heading}`"));
        let level = heading.split(' ').next().unwrap();
        let body = &guide[start + 1..];
        let end = body
            .match_indices("\n#")
            .find(|(i, _)| {
                let line = &body[i + 1..];
                let hashes = line.len() - line.trim_start_matches('#').len();
                hashes <= level.len() && line[hashes..].starts_with(' ')
            })
            .map_or(body.len(), |(i, _)| i);
        &body[..end]
    }

    /// The guide's heading for the table of a key path.
    fn heading(path: &str) -> &'static str {
        let parts: Vec<&str> = path.split('.').collect();
        match parts.as_slice() {
            ["plans", _, "quotas", ..] | ["tenants", _, "overrides", "quotas", ..] => "### `quotas.METER`",
            ["plans", _, "recharge", ..] => "### `recharge.METER`",
            ["tenants", _, "overrides", ..] => "### Per-tenant overrides",
            ["stripe", "credits", ..] => "### `[stripe.credits]`",
            ["plans", ..] => "## `[plans.NAME]`",
            ["meters", ..] => "## `[meters.NAME]`",
            ["tenants", ..] => "## `[tenants.NAME]`",
            ["orgs", ..] => "## `[orgs.NAME]`",
            ["tiers", ..] => "## `[tiers.NAME]`",
            ["routes", ..] => "## `[[routes]]`",
            ["store", ..] => "## `[store]`",
            ["identify", ..] => "## `[identify]`",
            ["limits", ..] => "## `[limits]`",
            ["usage", ..] => "## `[usage]`",
            ["events", ..] => "## `[events]`",
            ["export", ..] => "## `[export]`",
            ["stripe", ..] => "## `[stripe]`",
            ["metronome", ..] => "## `[metronome]`",
            ["alerts", ..] => "## `[alerts]`",
            ["billing", ..] => "## `[billing]`",
            ["dashboard", ..] => "## `[dashboard]`",
            _ => panic!("no table in the guide for `{path}`"),
        }
    }

    /// docs/configuration.md, the guide, names every key of the reference in its table's
    /// section.
    #[test]
    fn the_configuration_guide_names_every_key_of_the_reference_in_its_table() {
        let guide = include_str!("../../docs/configuration.md");
        let (all, _) = keys();
        let absent: Vec<&String> = all
            .iter()
            .filter(|path| {
                let key = path.rsplit('.').next().unwrap();
                if !path.contains('.') || key == "*" {
                    return false;
                }
                let text = section(guide, heading(path));
                // As a key (`key`, `key = …`), or as a table's name (`quotas.METER`,
                // `[stripe.credits]`, `[tenants.X.overrides]`).
                let named = [
                    format!("`{key}`"),
                    format!("`{key} ="),
                    format!("`{key}."),
                    format!(".{key}]"),
                    format!(".{key}."),
                    // A dotted key assigned (`hold.tokens = 4096`).
                    format!(".{key} ="),
                ];
                !named.iter().any(|n| text.contains(n.as_str()))
            })
            .collect();
        assert!(
            absent.is_empty(),
            "docs/configuration.md does not name these keys in their table's section: {absent:?}"
        );
    }

    /// Every value the reference shows is one its key accepts: the reference loads as one
    /// configuration once the keys that exclude each other (named at its top) are taken apart,
    /// and each of those loads with what it needs.
    #[cfg(all(
        feature = "stripe",
        feature = "metronome",
        feature = "dynamodb",
        feature = "postgres",
        feature = "redis",
        feature = "alerts"
    ))]
    #[test]
    fn every_value_of_the_reference_is_one_its_key_accepts() {
        let load = |t: &toml::Table, what: &str| {
            let text = toml::to_string(t).unwrap();
            if let Err(e) = crate::Config::from_toml_str(&text) {
                panic!("src/config/reference.toml, {what}: {e}");
            }
        };
        let doc: toml::Table = toml::from_str(REFERENCE).unwrap();
        let table = |t: &toml::Table, key: &str| -> toml::Table {
            t.get(key).and_then(toml::Value::as_table).cloned().unwrap_or_else(|| panic!("no [{key}]"))
        };
        let mut main = doc.clone();
        // The alert endpoints' secrets: the variable one names, the file the other does.
        std::env::set_var("TOLLGATE_ALERTS_OPS_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let secrets = tempfile_in_target("tollgate-alerts", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n");
        let mut alerts = table(&main, "alerts");
        let mut endpoints = table(&alerts, "endpoints");
        let mut billing = table(&endpoints, "billing");
        billing.insert("secret_file".into(), secrets.to_string_lossy().into_owned().into());
        endpoints.insert("billing".into(), billing.into());
        alerts.insert("endpoints".into(), endpoints.into());
        main.insert("alerts".into(), alerts.into());
        // The dashboard's token, in a file of its own.
        let token = tempfile_in_target("tollgate-dashboard", "an-access-token-of-32-characters\n");
        let mut dashboard = table(&main, "dashboard");
        dashboard.insert("token_file".into(), token.to_string_lossy().into_owned().into());
        main.insert("dashboard".into(), dashboard.into());
        let mut store = table(&main, "store");
        let roles: Vec<(&str, toml::Value)> =
            ROLES.iter().filter_map(|r| store.remove(*r).map(|section| (*r, section))).collect();
        main.insert("store".into(), store.into());
        let mut export = table(&main, "export");
        let file = export.remove("file").expect("export.file");
        main.insert("export".into(), export.clone().into());
        let metronome = main.remove("metronome").expect("[metronome]");
        let mut identify = table(&main, "identify");
        let anonymous = identify.remove("anonymous_plan").expect("identify.anonymous_plan");
        main.insert("identify".into(), identify.clone().into());
        load(&main, "as one configuration");
        // Each role's section, as the store of every role; a Redis one (which serves a few
        // roles only) as its role's, beside the PostgreSQL section as `[store]`.
        let kind = |section: &toml::Value| section.get("kind").and_then(toml::Value::as_str).map(str::to_owned);
        let durable =
            roles.iter().find(|(_, s)| kind(s).as_deref() == Some("postgres")).expect("a postgres role").1.clone();
        for (role, section) in roles {
            let mut t = main.clone();
            if kind(&section).as_deref() == Some("redis") {
                let mut store = durable.as_table().cloned().unwrap();
                store.insert(role.into(), section);
                t.insert("store".into(), store.into());
                load(&t, &format!("[store.{role}] beside [store] on postgres"));
            } else {
                t.insert("store".into(), section);
                load(&t, &format!("[store.{role}] as [store]"));
            }
        }
        // `export.file`, with the sink that takes it.
        let mut t = main.clone();
        let mut jsonl = export.clone();
        jsonl.insert("sink".into(), "jsonl".into());
        jsonl.insert("file".into(), file);
        t.insert("export".into(), jsonl.into());
        load(&t, "export.file with sink = \"jsonl\"");
        // `[metronome]`, with its sink.
        let mut t = main.clone();
        let mut sink = export.clone();
        sink.insert("sink".into(), "metronome".into());
        t.insert("export".into(), sink.into());
        t.insert("metronome".into(), metronome);
        load(&t, "[metronome] with sink = \"metronome\"");
        // `identify.anonymous_plan`, with unknown callers served anonymously.
        let mut t = main.clone();
        identify.insert("unknown".into(), "anonymous".into());
        identify.insert("anonymous_plan".into(), anonymous);
        t.insert("identify".into(), identify.into());
        load(&t, "identify.anonymous_plan with unknown = \"anonymous\"");
    }
}
