//! Billing: closed usage windows become meter events, sent to a [`BillingSink`] exactly once
//! per (tenant, meter, window, revision).

mod event;
mod jsonl;

pub use event::{identifier, BillingSink, MeterEvent, SinkError};
pub use jsonl::JsonlSink;
