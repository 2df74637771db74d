//! What clients see: headers, problem bodies, the conformance table on the tower layer, gRPC.
#![allow(missing_docs)]

#[path = "../common/mod.rs"]
mod common;
#[path = "../conformance/mod.rs"]
mod conformance;

mod concurrency;
mod doors;
mod grpc;
mod headers;
mod holds;
mod responses;
mod server;
