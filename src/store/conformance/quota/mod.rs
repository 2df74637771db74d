//! The quota role: its counters (`counters.rs`: reserve and release, caps, what senders keep)
//! its prepaid balances (`credits.rs`: grants, refunds, recharges) and open dimensions' values
//! (`values.rs`: claimed under a cap) and payments (`payments.rs`: counted once), one module of tests
//! for the role, as [`store_conformance!`](crate::store_conformance) calls them.

mod counters;
mod credits;
mod payments;
mod values;

pub use counters::*;
pub use credits::*;
pub use payments::*;
pub use values::*;
