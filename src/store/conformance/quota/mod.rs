//! The quota role: its counters (`counters.rs`: reserve and release, caps, what senders keep)
//! and its prepaid balances (`credits.rs`: grants, refunds, recharges), one module of tests
//! for the role, as [`store_conformance!`](crate::store_conformance) calls them.

mod counters;
mod credits;

pub use counters::*;
pub use credits::*;
