//! Auto-recharge of prepaid balances (docs/credits.md, "Recharge"): the claims this node's
//! refills make in the store (a mode of `reserve`:
//! [`RechargeMode::Watch`](crate::store::RechargeMode::Watch)), queued for the worker, and their
//! delivery through Stripe ([`deliver`]). A tenant's own settings within its plan's bounds are
//! a rule of its settings (`settings/recharge.rs`); what charges is billing's
//! ([`Charger`](crate::billing::Charger)).

pub(crate) mod deliver;
pub(crate) mod queue;

pub(crate) use queue::{Claimed, Recharges};
