//! Plans and routes compiled for the request path.

mod compiled;
mod route;

pub(crate) use compiled::{CompiledPlan, RouteCost, Runtime};
pub use route::RoutePattern;
