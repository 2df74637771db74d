//! The directory's administration, for the `tollgate` command and for teams that build their own
//! admin pages: tenants and their plans, API keys (issued, listed, rotated, revoked, imported),
//! the usage a tenant was billed, and the dead letters of the export. It works on the directory
//! role ([`DirectoryStore`](crate::store::DirectoryStore)) and the usage, export and ledger
//! roles ([`UsageExportStore`](crate::store::UsageExportStore)) of any store, and checks plans
//! against the configuration. Each change it makes to a tenant's settings is recorded in the
//! audit ([`AuditStore`](crate::store::AuditStore), kept with the directory), as made by its
//! [`operator`](Admin::operator).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use tollgate::admin::{Admin, KeyOptions};
//!
//! let config = tollgate::Config::from_toml_str("[store]\nkind = \"memory\"\n[plans.free]\nrate = \"10/s\"\n").unwrap();
//! let admin = Admin::open(&config).await.unwrap().operator("ana@ops");
//! admin.add_tenant("acme", "free", None).await.unwrap();
//! let issued = admin.issue_key("acme", KeyOptions::default()).await.unwrap();
//! assert!(issued.key.starts_with("tg_live_")); // shown once: only its hash is stored
//! assert_eq!(admin.keys("acme").await.unwrap()[0].id, issued.record.id);
//!
//! // Who changed what, newest first.
//! let audit = admin.audit(Some("acme"), None, 10).await.unwrap();
//! assert_eq!(audit.len(), 2);
//! assert_eq!(audit[0].setting, tollgate::store::Setting::Key);
//! assert_eq!(audit[1].after.as_deref(), Some("plan=free"));
//! assert_eq!(audit[1].actor.to_string(), "operator:ana@ops");
//! # }
//! ```

mod alerts;
mod audit;
mod caps;
mod credits;
mod error;
mod exports;
mod import;
mod keys;
mod open;
mod plans;
mod recharge;
mod search;
mod tallies;
mod tenants;

pub use audit::AUDIT_PAGE_MAX;
pub use error::AdminError;
pub use import::ImportReport;
pub use keys::{IssuedKey, KeyOptions};
pub use open::Admin;
pub use plans::{MigrateBatch, PlanVersions, MAX_MIGRATE_BATCH, VERSION_SCAN_TENANTS};
pub use search::{search_text, TenantSearch, KEY_SCAN_TENANTS, LEDGER_SCAN, MAX_SEARCH_LEN};
pub use tenants::CopyReport;
