//! Admission: a request described by its front door, its tenant found, its rate, idempotency
//! key and quota decided, without waiting where it can and on the store where it must; the
//! ticket that completes it.

pub(crate) mod admission;
pub(crate) mod capture;
pub(crate) mod charge;
pub(crate) mod clients;
pub(crate) mod directory;
pub(crate) mod door;
pub(crate) mod fleet;
pub(crate) mod idempotency;
pub(crate) mod places;
pub(crate) mod table;
pub(crate) mod ticket;
pub(crate) mod wait;
