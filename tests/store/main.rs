//! The stores: one behaviour suite per role run against every store, the SQLite store's
//! files and migrations, the DynamoDB and PostgreSQL stores behind engines, and crashes as real
//! processes.
#![allow(missing_docs)]

#[path = "../common/mod.rs"]
mod common;
#[cfg(feature = "dashboard")]
#[path = "../common/fleet_tallies.rs"]
mod fleet_tallies;

mod crash;
mod dynamodb;
mod ids;
mod postgres;
mod redis;
mod redis_cluster;
mod sqlite;
mod store_conformance;
