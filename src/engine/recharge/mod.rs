//! Auto-recharge of prepaid balances (docs/credits.md, "Recharge"): a tenant's own settings
//! within its plan's bounds ([`settings`]), the claims this node's refills make in the store
//! (a mode of `reserve`: [`RechargeMode::Watch`](crate::store::RechargeMode::Watch)), and their
//! delivery through Stripe by the worker ([`deliver`]).

pub(crate) mod deliver;
pub(crate) mod queue;
pub(crate) mod settings;

pub(crate) use queue::{Charger, Claimed, Recharges};
