//! Admission: a request described by its front door, its tenant found, its rate, idempotency
//! key and quota decided, without waiting where it can and on the store where it must; the
//! ticket that completes it. The part is [`Gate`](gate::Gate) (`gate.rs`); its verbs are spread
//! by flow over the files below, and the state machine a pending request goes through is in
//! `stage.rs`.

pub(crate) mod admission;
pub(crate) mod capture;
pub(crate) mod charge;
pub(crate) mod clients;
pub(crate) mod directory;
pub(crate) mod entry;
pub(crate) mod fleet;
pub(crate) mod follow;
pub(crate) mod gate;
pub(crate) mod idempotency;
pub(crate) mod keyed;
pub(crate) mod org;
#[cfg(test)]
mod paths;
pub(crate) mod place_node;
pub(crate) mod places;
pub(crate) mod quota;
pub(crate) mod rate;
#[cfg(feature = "dashboard")]
pub(crate) mod recent;
pub(crate) mod stage;
pub(crate) mod ticket;
pub(crate) mod wait;
