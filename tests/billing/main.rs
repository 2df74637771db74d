//! Billing: the Stripe export end to end against the stand-in, and Stripe webhooks.
#![allow(missing_docs)]

#[path = "../common/mod.rs"]
mod common;

mod fixture;
mod grace;
mod invoices;
mod metronome;
mod recharge;
mod recharge_payments;
mod stripe;
mod tiers;
mod topups;
mod versions;
mod webhooks;
