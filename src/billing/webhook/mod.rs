//! Stripe webhooks that move tenants between plans: verified, de-duplicated and ordered in one
//! store write, applied at once on this node and within `limits.directory_ttl` on the others.

mod destination;
mod handler;
mod outcome;
mod subscriptions;
mod transition;
mod verify;

pub(crate) use super::stripe::read_secrets;
pub use handler::WebhookHandler;
pub use outcome::{WebhookOutcome, WebhookReply};
