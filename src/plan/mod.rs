//! Plans and routes compiled for the request path.

mod compiled;
mod route;

pub(crate) use compiled::{CompiledPlan, RouteCost, Runtime, StaticTenant};
pub use route::RoutePattern;
