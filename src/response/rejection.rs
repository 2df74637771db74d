use std::{borrow::Cow, fmt, sync::Arc, time::Duration};

use http::StatusCode;

use super::{emit, Field, HeaderState, Value};
use crate::{base::RejectionKind, config::TenantId, tenant::Tenant};

/// A request turned away by tollgate. The front doors answer it with a response (never a
/// service error) and put a clone in the response extensions.
#[derive(Clone)]
pub struct Rejection {
    // Boxed: rejections are the exception, and this keeps `Admission` small to move.
    pub(crate) inner: Box<Details>,
}

#[derive(Clone)]
pub(crate) struct Details {
    pub(crate) kind: RejectionKind,
    pub(crate) detail: Cow<'static, str>,
    pub(crate) policy: Option<String>,
    pub(crate) retry_after: Option<u64>,
    pub(crate) tenant: Option<TenantId>,
    /// The tenant's state, for the headers of its policies.
    pub(crate) state: Option<Tenant>,
    pub(crate) headers: HeaderState,
    pub(crate) challenge: Option<Arc<str>>,
    /// Shadow mode lets the request through: it is served without a tenant.
    pub(crate) shadowed: bool,
    /// Answered with the IETF draft's `quota-exceeded` problem type (`limits.headers =
    /// "draft"`, a 429 of the rate, a quota or concurrency).
    pub(crate) quota_exceeded_type: bool,
    /// The scope whose limit refused the request, beyond the tenant's own: `organization`.
    pub(crate) scope: Option<&'static str>,
}

impl Rejection {
    /// The same refusal, telling the client to retry in `secs` seconds (`Retry-After`).
    pub(crate) fn with_retry_after(mut self, secs: u64) -> Self {
        self.inner.retry_after = Some(secs);
        self
    }

    /// The same refusal, of `state`'s tenant (its headers and problem name it).
    pub(crate) fn for_tenant(mut self, state: &Tenant) -> Self {
        self.inner.tenant = Some(state.id.clone());
        self.inner.state = Some(state.clone());
        self
    }

    /// Whether shadow mode (`limits.shadow`) lets this request through although it would be
    /// refused (a missing, unknown or malformed credential): a front door serves it, without a
    /// tenant (no ticket, no usage), instead of answering the rejection. The tower layer and
    /// the actix-web middleware do; a front door of your own should too.
    #[must_use]
    pub fn is_shadowed(&self) -> bool {
        self.inner.shadowed
    }

    pub(crate) fn new(kind: RejectionKind, detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            inner: Box::new(Details {
                kind,
                detail: detail.into(),
                policy: None,
                retry_after: None,
                tenant: None,
                state: None,
                headers: HeaderState::default(),
                challenge: None,
                shadowed: false,
                quota_exceeded_type: false,
                scope: None,
            }),
        }
    }

    /// Ends an admission's span (feature `otel`) with this refusal: why, its status, its
    /// tenant and policy.
    #[cfg(feature = "otel")]
    pub(crate) fn trace(&self, span: crate::base::trace::RequestSpan) {
        let tenant = self.tenant().map(|t| t.as_str());
        let plan = self.inner.state.as_ref().map(|s| s.plan.id.as_str());
        if self.is_shadowed() {
            span.shadowed(self.kind().label(), tenant, plan);
        } else {
            span.refused(self.kind().label(), self.status_code(), tenant, plan, self.policy());
        }
    }

    /// Why the request was rejected.
    #[must_use]
    pub fn kind(&self) -> RejectionKind {
        self.inner.kind
    }

    /// The scope whose limit refused the request when it is not the tenant's own:
    /// `"organization"` for a limit of the tenant's organization (`[orgs.NAME]`). Also the
    /// problem's `scope` member; its policy is the organization's (`org-requests-month`).
    #[must_use]
    pub fn scope(&self) -> Option<&'static str> {
        self.inner.scope
    }

    /// The response status.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        self.inner.kind.status()
    }

    /// The response status, as a number (no `http` type: for front doors on another `http`
    /// version, such as actix-web 4).
    #[must_use]
    pub fn status_code(&self) -> u16 {
        self.inner.kind.status_code()
    }

    /// The content type of the default body, [`problem_json`](Self::problem_json).
    #[must_use]
    pub fn content_type(&self) -> &'static str {
        super::PROBLEM_JSON
    }

    /// What happened, for this occurrence.
    #[must_use]
    pub fn detail(&self) -> &str {
        &self.inner.detail
    }

    /// The problem type URI of this rejection's body: with `limits.headers = "draft"`, a 429 of
    /// the rate, a quota or concurrency has the IETF draft's
    /// `https://iana.org/assignments/http-problem-types#quota-exceeded` (its
    /// `violated-policies` name the `RateLimit-Policy` items, and `kind` keeps tollgate's);
    /// every other rejection, and every one under `"draft-compat"`, `"legacy"` or `"none"`,
    /// [`RejectionKind::problem_type`].
    #[must_use]
    pub fn problem_type(&self) -> &'static str {
        if self.inner.quota_exceeded_type {
            QUOTA_EXCEEDED_TYPE
        } else {
            self.inner.kind.problem_type()
        }
    }

    /// The violated policy (`rate`, or `METER-PERIOD` such as `requests-day`), if any.
    #[must_use]
    pub fn policy(&self) -> Option<&str> {
        self.inner.policy.as_deref()
    }

    /// How long to wait before retrying, when known.
    pub fn retry_after(&self) -> Option<Duration> {
        self.inner.retry_after.map(Duration::from_secs)
    }

    /// The tenant, when it was identified.
    #[must_use]
    pub fn tenant(&self) -> Option<&TenantId> {
        self.inner.tenant.as_ref()
    }

    /// The `WWW-Authenticate` challenge of a 401.
    #[must_use]
    pub fn challenge(&self) -> Option<&str> {
        self.inner.challenge.as_deref()
    }

    /// Writes the rate-limit header fields and `Retry-After` of the response through `put`.
    pub fn for_each_header(&self, mut put: impl FnMut(Field, &str)) {
        self.emit(&mut |field, value| put(field, value.as_str()));
    }

    pub(crate) fn emit(&self, put: &mut dyn FnMut(Field, Value<'_>)) {
        match &self.inner.state {
            Some(state) => emit(&state.plan, &self.inner.headers, self.inner.retry_after, Some(state), put),
            None => {
                if let Some(secs) = self.inner.retry_after {
                    put(Field::RetryAfter, Value::Borrowed(itoa::Buffer::new().format(secs)));
                }
            }
        }
    }

    /// The RFC 9457 `application/problem+json` body.
    ///
    /// Members: `type`, `title`, `status`, `detail`, and when they apply `policy` (the violated
    /// policy) and `retry_after` (seconds).
    #[must_use]
    pub fn problem_json(&self) -> Vec<u8> {
        let mut body = serde_json::json!({
            "type": self.problem_type(),
            "title": self.inner.kind.title(),
            "status": self.status().as_u16(),
            "detail": self.inner.detail,
        });
        if self.inner.quota_exceeded_type {
            // The draft's members, and tollgate's kind beside them.
            body["violated-policies"] = serde_json::json!(self.inner.policy.as_deref().into_iter().collect::<Vec<_>>());
            body["kind"] = self.inner.kind.label().into();
        }
        if let Some(policy) = &self.inner.policy {
            body["policy"] = policy.as_str().into();
        }
        if let Some(secs) = self.inner.retry_after {
            body["retry_after"] = secs.into();
        }
        if let Some(scope) = self.inner.scope {
            body["scope"] = scope.into();
        }
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

impl fmt::Debug for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rejection")
            .field("kind", &self.inner.kind)
            .field("detail", &self.inner.detail)
            .field("policy", &self.inner.policy)
            .field("retry_after", &self.inner.retry_after)
            .field("tenant", &self.inner.tenant)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.inner.kind.title(), self.inner.detail)
    }
}

/// The problem type of ratelimit-headers draft-10 for requests past a quota policy.
pub(crate) const QUOTA_EXCEEDED_TYPE: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";

/// Why a repeated API key header is refused; a key with a comma (a repeated header joined by
/// a proxy) gets the same answer.
pub(crate) const REPEATED_KEY: &str =
    "the API key header is repeated (or has a comma, as a proxy joins repeated values)";
/// Why a repeated `Idempotency-Key` header is refused; a key with a comma likewise.
pub(crate) const REPEATED_IDEMPOTENCY_KEY: &str =
    "the Idempotency-Key header is repeated (or has a comma, as a proxy joins repeated values)";
