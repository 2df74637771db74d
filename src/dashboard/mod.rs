//! The operator dashboard (feature `dashboard`): read-only pages of every tenant (search, plan,
//! balances, usage charts, keys by prefix, grants, caps, recharges), billing (windows pending
//! export, dead letters, reconciliation's findings, the sink), alerts (pending, delivered,
//! dead) and, mounted in a running application, the node (its counters, open holds, store
//! health). Rendered on the server, assets compiled in, no script; read through
//! [`Admin`](crate::admin::Admin), as the `tollgate` command reads. The
//! [dashboard guide](crate::guide::dashboard) shows how to mount it.

mod access;
mod data;
mod guard;
mod html;
mod pages;
mod serve;

pub use access::{Access, AccessError, SESSION_SECS};
pub use guard::{Client, MAX_FAILED_TRIES, MAX_SIGNED_OUT, TRY_WINDOW_SECS};
pub use serve::{Dashboard, CONTENT_SECURITY_POLICY, MAX_BODY};
