use http::Request;

use crate::engine::RequestView;
use crate::{config::Identify, tenant::Credential};

/// Finds what identifies the tenant of a request.
///
/// Functions `fn(&Request<B>, &Identify) -> Credential<'_>` are resolvers too.
///
/// ```
/// use tollgate::{config::Identify, door::Credential, TenantResolver};
/// fn from_query<'r, B>(req: &'r http::Request<B>, _: &Identify) -> Credential<'r> {
///     match req.uri().query().and_then(|q| q.strip_prefix("key=")) {
///         Some(key) => Credential::ApiKey(key.as_bytes()),
///         None => Credential::Missing,
///     }
/// }
/// fn assert_resolver<R: TenantResolver<()>>(_: R) {}
/// assert_resolver(from_query::<()>);
/// ```
pub trait TenantResolver<B>: Clone + Send + Sync + 'static {
    /// The credential of `request`; `identify` is the configured way.
    fn resolve<'r>(&self, request: &'r Request<B>, identify: &Identify) -> Credential<'r>;
}

impl<B, F> TenantResolver<B> for F
where
    F: for<'r> Fn(&'r Request<B>, &Identify) -> Credential<'r> + Clone + Send + Sync + 'static,
{
    fn resolve<'r>(&self, request: &'r Request<B>, identify: &Identify) -> Credential<'r> {
        self(request, identify)
    }
}

/// The default resolver: follows `[identify]` in the configuration (an API key header, or an
/// [`Identity`](crate::tenant::Identity) in the request extensions).
#[derive(Debug, Clone, Copy, Default)]
pub struct FromConfig;

impl<B> TenantResolver<B> for FromConfig {
    #[inline]
    fn resolve<'r>(&self, request: &'r Request<B>, identify: &Identify) -> Credential<'r> {
        // As every front door reads a request: `RequestView` of an `http::Request`.
        crate::engine::credential_by(identify, |header| request.header_values_named(header), || request.identity())
    }
}
