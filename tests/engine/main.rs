//! The engine through the public API: rate, quotas, the usage pipeline, usage events, plan
//! features and overrides, shadow mode, client addresses, idempotency, reports, shutdown, the
//! directory and the metrics.
#![allow(missing_docs)]

#[path = "../common/mod.rs"]
mod common;
#[cfg(feature = "dashboard")]
#[path = "../common/fleet_tallies.rs"]
mod fleet_tallies;

mod alerts;
mod balances;
mod clients;
mod credits;
#[cfg(feature = "dashboard")]
mod dashboard;
mod dimensions;
mod directory;
mod events;
mod features;
mod fleet;
mod holds;
mod idempotency;
mod limits;
mod metrics;
mod money;
mod moves;
mod open_values;
mod orgs;
mod pipeline;
mod places;
mod quotas;
mod reports;
mod settings_audit;
mod shadow;
mod shutdown;
mod usage_report;
mod usage_route;
