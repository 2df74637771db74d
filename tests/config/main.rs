//! The configuration through the public API: the shipped example, tenant ids, errors in files.
#![allow(missing_docs)]

mod house;
mod past_due;
mod tiers;
mod versions;

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

#[test]
fn the_store_section_selects_the_store_and_unknown_kinds_are_placed() {
    use tollgate::config::{StoreSettings, Synchronous};
    // Without a section: SQLite in tollgate.db, fully synchronous.
    let config = Config::from_toml_str("[plans.free]\n").unwrap();
    assert_eq!(config.store(), &StoreSettings::Sqlite { path: "tollgate.db".into(), synchronous: Synchronous::Full });
    assert!(!config.names_store());
    let config = Config::from_toml_str("[store]\nkind = \"memory\"\n[plans.free]\n").unwrap();
    assert_eq!(config.store(), &StoreSettings::Memory);
    let config =
        Config::from_toml_str("[store]\nkind = \"sqlite\"\npath = \"/var/lib/x.db\"\nsynchronous = \"normal\"\n")
            .unwrap();
    assert_eq!(
        config.store(),
        &StoreSettings::Sqlite { path: "/var/lib/x.db".into(), synchronous: Synchronous::Normal }
    );
    let config = Config::from_toml_str("[store]\nkind = \"dynamodb\"\ntable = \"tollgate\"\n").unwrap();
    assert_eq!(config.store(), &StoreSettings::Dynamodb { table: "tollgate".into(), endpoint: None });

    let err = Config::from_toml_str("[plans.free]\n\n[store]\nkind = \"mysql\"\n").unwrap_err();
    assert_eq!((err.key(), err.line(), err.kind()), ("store.kind", Some(4), ConfigErrorKind::InvalidValue));
    assert!(err.message().contains("unknown store kind `mysql`"), "{err}");
    assert!(err.message().contains("\"postgres\""), "{err}");
    let err = Config::from_toml_str("[store]\nkind = \"memory\"\npath = \"x.db\"\n").unwrap_err();
    assert_eq!((err.key(), err.line()), ("store.path", Some(3)));
    let err = Config::from_toml_str("[store]\nkind = \"dynamodb\"\n").unwrap_err();
    assert_eq!(err.key(), "store.table");
    let err = Config::from_toml_str("[store]\nkind = \"sqlite\"\nsynchronous = \"off\"\n").unwrap_err();
    assert_eq!((err.key(), err.line()), ("store.synchronous", Some(3)));
    let err = Config::from_toml_str("[store]\nkind = \"sqlite\"\nfile = \"x.db\"\n").unwrap_err();
    assert_eq!((err.key(), err.line(), err.kind()), ("store.file", Some(3), ConfigErrorKind::UnknownKey));
}

#[test]
fn a_postgres_store_reads_its_keys_and_never_shows_its_url() {
    use tollgate::config::StoreSettings;
    let config = Config::from_toml_str(
        "[store]\nkind = \"postgres\"\nurl = \"postgres://app:s3cret@db:5432/app\"\nschema = \"billing_a\"\n\
         pool_size = 4\nstatement_timeout = \"2s\"\nmigrate = \"verify\"\n",
    )
    .unwrap();
    let StoreSettings::Postgres(p) = config.store() else { panic!("{:?}", config.store()) };
    assert_eq!(p.url.as_deref(), Some("postgres://app:s3cret@db:5432/app"));
    assert_eq!((p.schema.as_str(), p.pool_size), ("billing_a", 4));
    assert_eq!(
        (p.statement_timeout, p.migrate),
        (std::time::Duration::from_secs(2), tollgate::config::Migrate::Verify)
    );
    assert!(config.store().is_shared());
    // The URL may hold a password: neither the summary nor the debug form shows it.
    assert_eq!(config.store().to_string(), "postgres schema billing_a");
    assert!(!format!("{config:?}").contains("s3cret"));
    // Defaults: DATABASE_URL at open, schema `tollgate`, migrations applied.
    let config = Config::from_toml_str("[store]\nkind = \"postgres\"\n").unwrap();
    let StoreSettings::Postgres(p) = config.store() else { panic!() };
    assert_eq!((p.url.as_deref(), p.schema.as_str(), p.migrate), (None, "tollgate", tollgate::config::Migrate::Auto));

    for (toml, key, line) in [
        ("[store]\nkind = \"postgres\"\nschema = \"Public; DROP\"\n", "store.schema", 3),
        ("[store]\nkind = \"postgres\"\nschema = \"pg_catalog\"\n", "store.schema", 3),
        ("[store]\nkind = \"postgres\"\npool_size = 0\n", "store.pool_size", 3),
        ("[store]\nkind = \"postgres\"\nmigrate = \"never\"\n", "store.migrate", 3),
        ("[store]\nkind = \"postgres\"\nstatement_timeout = \"soon\"\n", "store.statement_timeout", 3),
        ("[store]\nkind = \"postgres\"\nstatement_timeout = \"30days\"\n", "store.statement_timeout", 3),
        ("[store]\nkind = \"postgres\"\npath = \"x.db\"\n", "store.path", 3),
        ("[store]\nkind = \"sqlite\"\nurl = \"postgres://x\"\n", "store.url", 3),
        ("[store]\nkind = \"dynamodb\"\ntable = \"t\"\nschema = \"x\"\n", "store.schema", 4),
    ] {
        let err = Config::from_toml_str(toml).unwrap_err();
        assert_eq!((err.key(), err.line()), (key, Some(line)), "{toml}: {err}");
    }
}

#[tokio::test]
async fn a_store_kind_not_compiled_in_is_an_error_at_build_naming_the_feature() {
    #[cfg(not(feature = "dynamodb"))]
    {
        let config = Config::from_toml_str("[store]\nkind = \"dynamodb\"\ntable = \"t\"\n[plans.free]\n").unwrap();
        let err = tollgate::Tollgate::builder(config).open().await.unwrap_err();
        assert!(
            matches!(err, tollgate::BuildError::MissingFeature { kind: "dynamodb", feature: "dynamodb" }),
            "{err:?}"
        );
        assert!(err.to_string().contains("cargo feature `dynamodb`"), "{err}");
    }
    #[cfg(not(feature = "postgres"))]
    {
        let config = Config::from_toml_str("[store]\nkind = \"postgres\"\n[plans.free]\n").unwrap();
        let err = tollgate::Tollgate::builder(config).open().await.unwrap_err();
        assert!(err.to_string().contains("cargo feature `postgres`"), "{err}");
    }
    #[cfg(not(feature = "sqlite"))]
    {
        let config = Config::from_toml_str("[store]\nkind = \"sqlite\"\n[plans.free]\n").unwrap();
        let err = tollgate::Tollgate::builder(config).open().await.unwrap_err();
        assert!(err.to_string().contains("cargo feature `sqlite`"), "{err}");
    }
    // Alerts cannot be delivered without their feature: refused at load, at the key.
    #[cfg(not(feature = "alerts"))]
    {
        let e = Config::from_toml_str("[plans.free]\n[alerts.endpoints.ops]\nurl = \"https://x.example.com/\"\n")
            .unwrap_err();
        assert_eq!(e.key(), "alerts.endpoints", "{e}");
        assert!(e.to_string().contains("cargo feature `alerts`"), "{e}");
        let e = Config::from_toml_str("[plans.free]\ntenant_alerts = true\n").unwrap_err();
        assert_eq!((e.key(), e.line()), ("plans.free.tenant_alerts", Some(2)), "{e}");
    }
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn a_reload_that_changes_the_store_is_refused_and_the_running_store_stays() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tollgate.toml");
    let first = format!(
        "[store]\nkind = \"sqlite\"\npath = {:?}\n\n[plans.free]\nrate = \"10/s\"\n",
        dir.path().join("a.db").display().to_string()
    );
    std::fs::write(&file, &first).unwrap();
    let (tollgate, _worker) = tollgate::Tollgate::builder(Config::from_path(&file).unwrap()).open().await.unwrap();
    assert!(format!("{:?}", tollgate.usage_store()).contains("a.db"));

    // Another path, and another rate: the whole reload is refused.
    let second = format!(
        "[plans.free]\nrate = \"99/s\"\n\n[store]\nkind = \"sqlite\"\npath = {:?}\n",
        dir.path().join("b.db").display().to_string()
    );
    std::fs::write(&file, &second).unwrap();
    let err = tollgate.reload(Config::from_path(&file).unwrap()).await.unwrap_err();
    assert_eq!((err.key(), err.line(), err.kind()), ("store.path", Some(6), ConfigErrorKind::Conflict));
    assert_eq!(err.file(), Some(file.as_path()));
    assert!(err.to_string().starts_with(&format!("{}:6:", file.display())), "{err}");
    assert!(!dir.path().join("b.db").exists(), "the new store was not opened");
    assert!(format!("{:?}", tollgate.usage_store()).contains("a.db"));
    let rate = tollgate.config().plan(&"free".into()).unwrap().rate().unwrap();
    assert_eq!(rate.to_string(), "10/s", "the running configuration stays");

    // Another kind.
    std::fs::write(&file, "[plans.free]\n[store]\nkind = \"memory\"\n").unwrap();
    let err = tollgate.reload(Config::from_path(&file).unwrap()).await.unwrap_err();
    assert_eq!((err.key(), err.line()), ("store.kind", Some(3)));
    // The section removed: the default store (tollgate.db) is another file.
    std::fs::write(&file, "[plans.free]\n").unwrap();
    let err = tollgate.reload(Config::from_path(&file).unwrap()).await.unwrap_err();
    assert_eq!(err.key(), "store.path");
    assert!(err.message().contains("tollgate.db"), "{err}");
    // The same store: accepted.
    std::fs::write(&file, first.replace("10/s", "20/s")).unwrap();
    tollgate.reload(Config::from_path(&file).unwrap()).await.unwrap();
    assert_eq!(tollgate.config().plan(&"free".into()).unwrap().rate().unwrap().to_string(), "20/s");
}

/// The `toml` blocks of the guides (`docs/`, `integrations/*/docs/`) and the README, with the line each starts on and
/// the marker before it (`<!-- toml: fragment -->`, `<!-- toml: cargo -->`), if any.
fn toml_blocks() -> Vec<(String, usize, Option<String>, String)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    // The door crates' guides, each inside its own package.
    for entry in std::fs::read_dir(root.join("integrations")).unwrap() {
        let guide = entry.unwrap().path().join("docs/guide.md");
        if guide.exists() {
            files.push(guide);
        }
    }
    files.sort();
    files.push(root.join("README.md"));
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            if lines[i].trim_end() == "```toml" {
                let marker = lines[..i]
                    .iter()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .and_then(|l| l.trim().strip_prefix("<!-- toml: "))
                    .and_then(|l| l.strip_suffix(" -->"))
                    .map(str::to_owned);
                let start = i + 1;
                let mut body = String::new();
                i += 1;
                while i < lines.len() && !lines[i].starts_with("```") {
                    body.push_str(lines[i]);
                    body.push('\n');
                    i += 1;
                }
                out.push((file.strip_prefix(root).unwrap().display().to_string(), start, marker, body));
            }
            i += 1;
        }
    }
    out
}

/// Every `toml` block of the guides and the README is a configuration tollgate accepts as it
/// is; a block marked `<!-- toml: fragment -->` (some sections of a larger file) is TOML whose
/// sections are the configuration's; one marked `<!-- toml: cargo -->` is a Cargo manifest.
#[test]
fn the_toml_blocks_of_the_docs_are_valid_configurations() {
    const SECTIONS: &[&str] = &[
        "store",
        "identify",
        "usage",
        "meters",
        "plans",
        "routes",
        "tenants",
        "orgs",
        "tiers",
        "limits",
        "export",
        "stripe",
        "metronome",
        "events",
        "alerts",
        "billing",
    ];
    let blocks = toml_blocks();
    assert!(blocks.len() >= 10, "the docs' toml blocks were found: {}", blocks.len());
    let doors = blocks.iter().filter(|(file, ..)| file.starts_with("integrations/")).count();
    assert!(doors >= 3, "the door guides' toml blocks were found: {doors}");
    let mut full = 0;
    for (file, line, marker, body) in blocks {
        let place = format!("{file}:{line}");
        match marker.as_deref() {
            None => {
                if let Err(e) = Config::from_toml_str(&body) {
                    panic!("{place}: not a valid configuration: {e}");
                }
                full += 1;
            }
            Some("fragment") => {
                let table: toml::Table = body.parse().unwrap_or_else(|e| panic!("{place}: not TOML: {e}"));
                for key in table.keys() {
                    assert!(SECTIONS.contains(&key.as_str()), "{place}: `{key}` is not a section of the configuration");
                }
            }
            Some("cargo") => {
                let table: toml::Table = body.parse().unwrap_or_else(|e| panic!("{place}: not TOML: {e}"));
                assert!(table.contains_key("dependencies"), "{place}: a Cargo manifest names dependencies");
            }
            Some(other) => panic!("{place}: unknown marker `{other}`"),
        }
    }
    assert!(full >= 5, "most blocks are whole configurations: {full}");
}

/// The pictures of the docs (taken by scripts/dashboard-browser.sh from the example's week of
/// 50 tenants) are PNGs of at most 200 KB, and each one the guide shows is there.
#[test]
fn the_docs_pictures_are_small_pngs_the_guide_shows() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/images");
    let guide =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/dashboard.md")).unwrap();
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("png") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is a PNG", path.display());
        assert!(bytes.len() <= 200 * 1024, "{}: {} bytes, more than 200 KB", path.display(), bytes.len());
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        assert!(guide.contains(&format!("(images/{name})")), "docs/dashboard.md shows {name}");
        seen += 1;
    }
    for shown in guide.split("(images/").skip(1).map(|r| r.split(')').next().unwrap()) {
        assert!(dir.join(shown).exists(), "docs/dashboard.md shows images/{shown}, which is missing");
    }
    assert!(seen >= 7, "{seen} pictures");
}

/// docs/architecture.md's source layout names every source file of the crate, in the row of
/// its folder (a backend folder of `src/store/` in the store's row).
#[test]
fn the_architecture_guide_names_every_source_file() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let guide = std::fs::read_to_string(root.join("docs/architecture.md")).unwrap();
    let section = guide.split("## Source layout").nth(1).unwrap().split("\n## ").next().unwrap();
    let row = |folder: &str| -> &str {
        section
            .lines()
            .find(|l| l.starts_with(&format!("| `{folder}")))
            .unwrap_or_else(|| panic!("docs/architecture.md has no row for `{folder}`"))
    };
    let mut stack = vec![root.join("src")];
    let mut seen = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            // A file of `src/` itself has a row of its own; one in a folder is named in its
            // folder's row (a store backend's folder, in the store's row).
            let parts: Vec<&str> = rel.split('/').collect();
            if parts.len() == 2 {
                row(&rel);
            } else if name != "mod.rs" {
                let folder = format!("{}/{}/", parts[0], parts[1]);
                let text = row(&folder);
                assert!(
                    text.contains(&format!("`{name}`")),
                    "docs/architecture.md: the `{folder}` row does not name `{name}`"
                );
            }
            seen += 1;
        }
    }
    assert!(seen > 50, "{seen} files");
}

/// `[store.ROLE]` sections: a role's own store, checked with the keys of `[store]` and placed
/// by file, line and key; a role's section holds no other role's.
#[test]
fn a_role_can_name_a_store_of_its_own() {
    use tollgate::config::{StoreRole, StoreSettings};
    let config = Config::from_toml_str(
        "[store]\nkind = \"sqlite\"\npath = \"t.db\"\n[store.directory]\nkind = \"sqlite\"\npath = \"d.db\"\n[store.idempotency]\nkind = \"memory\"\n",
    )
    .unwrap();
    assert!(matches!(config.store_of(StoreRole::Quota), StoreSettings::Sqlite { path, .. } if path.ends_with("t.db")));
    assert!(matches!(config.store_of(StoreRole::Usage), StoreSettings::Sqlite { path, .. } if path.ends_with("t.db")));
    assert!(
        matches!(config.store_of(StoreRole::Directory), StoreSettings::Sqlite { path, .. } if path.ends_with("d.db"))
    );
    assert_eq!(config.store_of(StoreRole::Idempotency), &StoreSettings::Memory);
    let config = Config::from_toml_str(
        "[store]\nkind = \"dynamodb\"\ntable = \"t\"\n[store.directory]\nkind = \"dynamodb\"\ntable = \"directory\"\n",
    )
    .unwrap();
    assert!(
        matches!(config.store_of(StoreRole::Directory), StoreSettings::Dynamodb { table, .. } if table == "directory")
    );

    let err =
        Config::from_toml_str("[store]\nkind = \"dynamodb\"\ntable = \"t\"\n[store.directory]\nkind = \"dynamodb\"\n")
            .unwrap_err();
    assert_eq!(err.key(), "store.directory.table", "{err}");
    let err = Config::from_toml_str("[store.usage]\nkind = \"memory\"\npath = \"x.db\"\n").unwrap_err();
    assert_eq!(err.key(), "store.usage.path", "{err}");
    let err = Config::from_toml_str("[store.usage]\nkind = \"memory\"\ntabel = \"x\"\n").unwrap_err();
    assert!(err.to_string().contains("tabel") && err.line() == Some(3), "{err}");
    let err = Config::from_toml_str("[store.directory.quota]\nkind = \"memory\"\n").unwrap_err();
    assert_eq!(err.key(), "store.directory.quota", "{err}");
    let err = Config::from_toml_str("[store.billing]\nkind = \"memory\"\n").unwrap_err();
    assert!(err.to_string().contains("billing"), "{err}");
}

/// A store shared by a fleet (DynamoDB) for one role and one node's own (memory, a SQLite file)
/// for another is refused, placed at the role's section: each node would count its own quotas
/// (the fleet admitting N times a hard limit), accept another node's replays, keep plan changes a
/// webhook made on another node, or export the same window as another node.
#[test]
fn a_fleet_store_serves_every_role() {
    const FLEET: &str = "[store]\nkind = \"dynamodb\"\ntable = \"t\"\n";
    for (role, own) in [
        ("quota", "kind = \"memory\"\n"),
        ("idempotency", "kind = \"sqlite\"\npath = \"i.db\"\n"),
        ("usage", "kind = \"sqlite\"\n"),
        ("directory", "kind = \"sqlite\"\npath = \"d.db\"\n"),
    ] {
        let err = Config::from_toml_str(&format!("{FLEET}[store.{role}]\n{own}")).unwrap_err();
        assert_eq!(err.key(), format!("store.{role}.kind"), "{err}");
        assert_eq!(err.line(), Some(5), "{err}");
        let text = err.to_string();
        assert!(text.contains("dynamodb") && text.contains(role) && text.contains("fleet"), "{text}");
    }
    // A role of the fleet's kind beside one node's store for the others: placed at the role too.
    let err = Config::from_toml_str("[store]\nkind = \"sqlite\"\n[store.quota]\nkind = \"dynamodb\"\ntable = \"q\"\n")
        .unwrap_err();
    assert_eq!(err.key(), "store.quota.kind", "{err}");
    assert_eq!(err.line(), Some(4), "{err}");
    let err = Config::from_toml_str("[store.usage]\nkind = \"dynamodb\"\ntable = \"u\"\n").unwrap_err();
    assert_eq!(err.key(), "store.usage.kind", "{err}");
    // A kind left out is SQLite's: still one node's.
    let err = Config::from_toml_str(&format!("{FLEET}[store.idempotency]\npath = \"i.db\"\n")).unwrap_err();
    assert!(err.key().starts_with("store.idempotency"), "{err}");
    assert_eq!(err.line(), Some(4), "{err}");
}

/// Every file a crate of the workspace includes (`include_str!`, `include_bytes!`) lies inside
/// its own package: `cargo package` and docs.rs build each crate from its package alone, so a
/// guide included from a sibling folder breaks the published crate.
#[test]
fn included_files_lie_inside_their_package() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut packages = vec![root.to_path_buf()];
    for entry in std::fs::read_dir(root.join("integrations")).unwrap() {
        let path = entry.unwrap().path();
        if path.join("Cargo.toml").exists() {
            packages.push(path);
        }
    }
    let mut seen = 0;
    for package in packages {
        let package = package.canonicalize().unwrap();
        let mut stack: Vec<_> =
            ["src", "examples", "benches"].iter().map(|d| package.join(d)).filter(|d| d.exists()).collect();
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                if path.extension().is_none_or(|e| e != "rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                for macro_name in ["include_str!(\"", "include_bytes!(\"", "include!(\""] {
                    for part in text.split(macro_name).skip(1) {
                        let included = &part[..part.find('"').unwrap()];
                        let file = path.parent().unwrap().join(included);
                        let file =
                            file.canonicalize().unwrap_or_else(|e| panic!("{}: `{included}`: {e}", path.display()));
                        assert!(
                            file.starts_with(&package),
                            "{} includes `{included}`, outside its package {}",
                            path.display(),
                            package.display()
                        );
                        seen += 1;
                    }
                }
            }
        }
    }
    assert!(seen >= 8, "{seen} included files");
}

/// `usage.billable_grpc` takes gRPC status names (any case) or numbers; anything else is placed
/// by file, line and key.
#[test]
fn billable_grpc_codes_are_checked() {
    Config::from_toml_str("[usage]\nbillable_grpc = [\"ok\", \"INVALID_ARGUMENT\", \"16\"]\n[plans.p]\n").unwrap();
    let err = Config::from_toml_str("[usage]\nbillable_grpc = [\"OK\", \"NOPE\"]\n[plans.p]\n").unwrap_err();
    assert_eq!(err.key(), "usage.billable_grpc[1]", "{err}");
    assert_eq!(err.line(), Some(2), "{err}");
    let err = Config::from_toml_str("[usage]\nbillable_grpc = [\"17\"]\n[plans.p]\n").unwrap_err();
    assert_eq!(err.key(), "usage.billable_grpc[0]", "{err}");
}

/// `export.reconcile_interval = "0s"` turns the worker's reconciliation off, as the docs say
/// (so a fleet can keep it on one node); between zero and a minute is refused.
#[test]
fn a_reconcile_interval_of_zero_turns_it_off() {
    let config = Config::from_toml_str("[export]\nreconcile_interval = \"0s\"\n").unwrap();
    assert!(config.export().reconcile_interval.is_zero());
    let e = Config::from_toml_str("[export]\nreconcile_interval = \"30s\"\n").unwrap_err();
    assert_eq!(e.key(), "export.reconcile_interval", "{e}");
    let e = Config::from_toml_str("[export]\nreconcile_after = \"0s\"\n").unwrap_err();
    assert_eq!(e.key(), "export.reconcile_after", "{e}");
}

/// `limits.idempotency_max_in_flight`: 15 minutes by default, longer than zero, at most a day.
#[test]
fn idempotency_max_in_flight_is_checked() {
    let config = Config::from_toml_str("[plans.p]\n").unwrap();
    assert_eq!(config.limits().idempotency_max_in_flight, Duration::from_secs(900));
    for bad in ["\"0s\"", "\"25h\"", "\"soon\""] {
        let e = Config::from_toml_str(&format!("[limits]\nidempotency_max_in_flight = {bad}\n")).unwrap_err();
        assert_eq!(e.key(), "limits.idempotency_max_in_flight", "{bad}: {e}");
    }
}
