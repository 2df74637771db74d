//! The tower front door: a [`Layer`](tower_layer::Layer) for axum, hyper, tonic and
//! `lambda_http`.

mod body;
mod future;
#[allow(clippy::module_inception)]
mod layer;
mod request;
mod resolver;
mod service;

// Moved: `respond` and `respond_for` are in `response`, `replay_response` in `door`; kept here
// too.
pub use crate::{
    door::replay_response,
    response::{respond, respond_for},
};
pub use body::TollgateBody;
pub use future::ResponseFuture;
pub use layer::TollgateLayer;
pub use request::{BodyMode, Buffered, RebuildBody, RequestBody, SameBody, Streamed};
pub use resolver::{FromConfig, TenantResolver};
pub use service::TollgateService;
