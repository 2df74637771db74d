//! The tower front door: a [`Layer`](tower_layer::Layer) for axum, hyper, tonic and
//! `lambda_http`.

mod body;
mod future;
#[allow(clippy::module_inception)]
mod layer;
mod resolver;
mod service;

pub use body::TollgateBody;
pub use future::ResponseFuture;
pub use layer::TollgateLayer;
pub use resolver::{FromConfig, TenantResolver};
pub use service::{respond, respond_for, TollgateService};
