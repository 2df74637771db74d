//! Time sources: the system clock, and a fake clock for tests.

mod source;

pub use source::{Clock, FakeClock};
