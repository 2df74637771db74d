//! Stripe webhooks that move tenants between plans: verified, de-duplicated and ordered in one
//! store write, applied at once on this node and within a second on the others (the directory's
//! feed of tenants changed).

mod destination;
mod handler;
mod outcome;
mod subscriptions;
mod tiers;
mod transition;
mod verify;

pub(crate) use super::stripe::read_secrets;
pub use handler::WebhookHandler;
pub use outcome::{WebhookOutcome, WebhookReply};
pub(crate) use subscriptions::past_due;
