//! The per-request fast path for front doors: the configuration cached per door, so a request
//! costs one relaxed load to see whether a reload replaced it.

use std::sync::Arc;

use super::{Admission, RequestInfo, RuntimeCache, Tollgate};
use crate::{config::Identify, plan::Runtime};

/// A front door's handle on the engine, with the configuration in force cached: what the
/// tower layer uses per request, for other front doors (actix-web, Lambda) to use the same
/// way. Keep one per service (or per worker thread): it is cheap to clone, and every clone
/// serves the same engine.
///
/// ```
/// use tollgate::{Admission, Credential, RequestInfo};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let config = tollgate::Config::from_toml_str(
///     "[plans.free]\nrate = \"5/s\"\n[tenants.acme]\nplan = \"free\"\nkeys = [\"tg_acme\"]",
/// ).unwrap();
/// let (tollgate, _worker) = tollgate::Tollgate::builder(config).build();
/// let mut door = tollgate.front_door();
/// let admission = door.admit_with(|_identify| RequestInfo::new("GET", "/", Credential::ApiKey(b"tg_acme")));
/// let ticket = match admission {
///     Admission::Admitted(ticket) => ticket,
///     Admission::Pending(pending) => tollgate.resolve(pending).await.unwrap(),
///     Admission::Rejected(rejection) => panic!("{rejection}"),
/// };
/// assert!(ticket.complete(200));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct FrontDoor {
    tollgate: Tollgate,
    runtime: RuntimeCache,
}

impl Tollgate {
    /// A [`FrontDoor`] on this engine.
    pub fn front_door(&self) -> FrontDoor {
        FrontDoor { tollgate: self.clone(), runtime: self.runtime_cache() }
    }
}

impl FrontDoor {
    /// The engine.
    pub fn engine(&self) -> &Tollgate {
        &self.tollgate
    }

    /// Decides on a request that `describe` builds from the configuration in force (or
    /// refuses before the engine sees it), with one load of the cached configuration.
    #[inline]
    pub(crate) fn admit_raw<'a>(
        &mut self,
        describe: impl FnOnce(&Runtime) -> Result<RequestInfo<'a>, crate::Rejection>,
    ) -> Admission {
        let FrontDoor { tollgate, runtime } = self;
        let rt: &Arc<Runtime> = runtime.load();
        match describe(rt) {
            Ok(req) => tollgate.admit_in(rt, &req),
            Err(rejection) => Admission::Rejected(tollgate.count(rejection)),
        }
    }

    /// Whether an `Idempotency-Key` on `method` is honoured (`limits.idempotency_methods`): a
    /// door reads the header only then.
    #[inline]
    pub fn honours_idempotency(&mut self, method: &str) -> bool {
        self.runtime.load().honours_idempotency(method)
    }

    /// Decides on a request without waiting, described by `describe` against the configured
    /// way of identifying tenants. An `Idempotency-Key` on a method that does not honour it is
    /// ignored. Most requests of known tenants are decided here; the rest come back as
    /// [`Admission::Pending`], for [`Tollgate::resolve`].
    #[inline]
    pub fn admit_with<'a>(&mut self, describe: impl FnOnce(&Identify) -> RequestInfo<'a>) -> Admission {
        self.admit_raw(|rt| {
            let mut req = describe(&rt.config.identify);
            if req.idempotency_key.is_some() && !rt.honours_idempotency(req.method) {
                req.idempotency_key = None;
            }
            Ok(req)
        })
    }
}
