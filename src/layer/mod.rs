//! The tower front door: a [`Layer`](tower_layer::Layer) for axum, hyper, tonic and
//! `lambda_http`.

mod body;
mod future;
#[allow(clippy::module_inception)]
mod layer;
mod request;
mod resolver;
mod respond;
mod service;

pub use body::TollgateBody;
pub use future::ResponseFuture;
pub use layer::TollgateLayer;
pub use request::{BodyMode, Buffered, RebuildBody, RequestBody, SameBody, Streamed};
pub use resolver::{FromConfig, TenantResolver};
pub use respond::{replay_response, respond, respond_for};
pub use service::TollgateService;
