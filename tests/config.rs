//! The configuration through the public API: the shipped example, tenant ids, errors in files.
#![allow(missing_docs)]

use std::time::Duration;

use tollgate::config::{ConfigErrorKind, InvalidTenantId, MeterId, TenantId};
use tollgate::Config;

#[test]
fn the_quickstart_example_loads_and_its_generate_route_reports_tokens() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/quickstart.toml");
    let config = Config::from_path(path).unwrap();
    let generate = config.routes().iter().find(|r| r.path() == "/v1/generate").unwrap();
    assert_eq!(generate.reports(), [MeterId::from("tokens")]);
    assert_eq!(config.usage().shutdown_timeout, Duration::from_secs(10));
    assert_eq!(config.limits().directory_ttl, Duration::from_secs(60));
}

#[test]
fn tenant_ids_are_public_api() {
    assert!(TenantId::is_valid("sub|1234"));
    assert_eq!(TenantId::parse("sub|1234").unwrap(), TenantId::from("sub|1234"));
    let err = TenantId::parse("a b").unwrap_err();
    assert_eq!(err, InvalidTenantId::Character { at: 1, found: ' ' });
    assert!(err.to_string().contains("1 to 128 visible ASCII characters"), "{err}");
}

#[test]
fn a_file_with_a_duplicate_key_names_file_line_and_key() {
    let path = std::env::temp_dir().join(format!("tollgate-config-test-{}.toml", std::process::id()));
    std::fs::write(&path, "[plans.a]\nrate = \"1/s\"\nrate = \"2/s\"\n").unwrap();
    let err = Config::from_path(&path).unwrap_err();
    std::fs::remove_file(&path).unwrap();
    assert_eq!((err.key(), err.line(), err.column()), ("plans.a.rate", Some(3), Some(1)));
    assert_eq!(err.file(), Some(path.as_path()));
    assert!(err.to_string().starts_with(&format!("{}:3:1: `plans.a.rate`: duplicate key", path.display())), "{err}");
}

#[test]
fn an_empty_file_is_an_error_but_a_file_without_plans_is_not() {
    let err = Config::from_toml_str("# to do\n").unwrap_err();
    assert_eq!(err.kind(), ConfigErrorKind::InvalidValue);
    assert_eq!((err.key(), err.line(), err.column()), ("", Some(1), Some(1)));
    assert!(Config::from_toml_str("[limits]\nheaders = \"none\"\n").unwrap().plans().is_empty());
}
