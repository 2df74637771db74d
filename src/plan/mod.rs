//! Plans and routes compiled for the request path.

mod compiled;
mod route;

pub(crate) use compiled::{policy_item, CompiledPlan, MeterTable, MonthPolicy, RouteCost, Runtime, StaticTenant};
pub(crate) use route::normalize_path;
pub use route::RoutePattern;
