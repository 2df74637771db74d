//! The background work of an engine, handed to the caller to spawn.

#[allow(clippy::module_inception)]
mod worker;

pub use worker::Worker;
