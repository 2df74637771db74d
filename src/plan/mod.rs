//! Plans and routes compiled for the request path.

mod compiled;

pub(crate) use compiled::{policy_item, CompiledPlan, MeterTable, MonthPolicy, RouteCost, Runtime, StaticTenant};
