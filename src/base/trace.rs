//! OpenTelemetry spans (feature `otel`): a request's admission, and the calls made under it or
//! under an export pass (stores, billing systems). Spans go to the global tracer provider
//! (`opentelemetry::global`), whichever SDK and exporter the application installed
//! (`tollgate::otel` installs OTLP's); with none, they are the API's no-op spans.
//!
//! Attributes follow OpenTelemetry's semantic conventions where one exists (`http.request.method`,
//! `url.path`, `http.response.status_code`, `db.system`, `db.operation.name`, `error.type`), and
//! are `tollgate.*` otherwise. A request's span is a child of the application's span when one
//! is active (an internal span), else a server span under the W3C trace context (`traceparent`,
//! `tracestate`) of its request, read only within bounds. Without the feature, none of this is
//! compiled: the request path counts the same instructions as before.

use std::borrow::Cow;

use opentelemetry::{
    global::{self, BoxedSpan},
    propagation::{Extractor, TextMapPropagator},
    trace::{SpanKind, Status, TraceContextExt, Tracer as _},
    Context, KeyValue,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The name of tollgate's tracer (its instrumentation scope).
pub(crate) const TRACER: &str = "tollgate";

/// The W3C header fields a request's parent is read from, and the longest value of each read
/// (a `traceparent` of version 00 is 55 bytes; a longer `tracestate` is dropped, as W3C lets a
/// vendor do): a client's header never grows a span.
const FIELDS: [(&str, usize); 2] = [("traceparent", 128), ("tracestate", 512)];

/// The longest `url.path` kept, in bytes (cut on a character's boundary).
const PATH_MAX: usize = 256;

/// The request's method as its span names it: one of HTTP's, or `_OTHER` (the semantic
/// conventions' word for a method a client made up: the span names stay few).
fn method_name(method: &str) -> &'static str {
    const KNOWN: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];
    KNOWN.into_iter().find(|m| *m == method).unwrap_or("_OTHER")
}

/// The request's `traceparent` and `tracestate`, as the propagator reads them.
struct Headers([Option<String>; 2]);

impl Extractor for Headers {
    fn get(&self, key: &str) -> Option<&str> {
        FIELDS.iter().position(|(f, _)| f.eq_ignore_ascii_case(key)).and_then(|i| self.0[i].as_deref())
    }

    fn keys(&self) -> Vec<&str> {
        FIELDS.iter().zip(&self.0).filter(|(_, v)| v.is_some()).map(|((k, _), _)| *k).collect()
    }
}

/// A request's admission as a span: started when the request comes to tollgate (its parent the
/// request's W3C trace context), ended with its decision. Dropped undecided (a pending request
/// whose client went away), it ends as `abandoned`.
#[derive(Debug)]
pub(crate) struct RequestSpan {
    cx: Context,
    ended: bool,
}

impl RequestSpan {
    /// Starts the span of a request of `method` on `path`; `header` reads a header's first
    /// value (the W3C fields). Under the application's active span, its child (internal: the
    /// application's is the server span); else a server span under the request's trace
    /// context, its fields read only when within their bounds.
    pub(crate) fn start<'h>(method: &str, path: &str, header: impl Fn(&str) -> Option<&'h [u8]>) -> Self {
        let current = Context::current();
        // The application's own span (not a context it only extracted): tollgate's is its child.
        let local = current.has_active_span() && !current.span().span_context().is_remote();
        let (parent, kind) = if local {
            (current, SpanKind::Internal)
        } else {
            let read = |(name, max): (&str, usize)| {
                header(name).filter(|v| v.len() <= max).and_then(|v| std::str::from_utf8(v).ok()).map(str::to_owned)
            };
            let headers = Headers([read(FIELDS[0]), read(FIELDS[1])]);
            (TraceContextPropagator::new().extract(&headers), SpanKind::Server)
        };
        let method = method_name(method);
        let mut end = path.len().min(PATH_MAX);
        while !path.is_char_boundary(end) {
            end -= 1;
        }
        let tracer = global::tracer(TRACER);
        let span = tracer
            .span_builder(format!("{method} tollgate"))
            .with_kind(kind)
            .with_attributes([
                KeyValue::new("http.request.method", method),
                KeyValue::new("url.path", path[..end].to_owned()),
            ])
            .start_with_context(&tracer, &parent);
        Self { cx: parent.with_span(span), ended: false }
    }

    /// Refused in shadow mode: served all the same (`shadow = true`), the refusal it would have
    /// been named, no status of its own.
    pub(crate) fn shadowed(mut self, kind: &'static str, tenant: Option<&str>, plan: Option<&str>) {
        let span = self.cx.span();
        span.set_attributes([KeyValue::new("tollgate.decision", "shadowed"), KeyValue::new("tollgate.refusal", kind)]);
        for (key, value) in [("tollgate.tenant", tenant), ("tollgate.plan", plan)] {
            if let Some(v) = value {
                span.set_attribute(KeyValue::new(key, v.to_owned()));
            }
        }
        self.end();
    }

    /// The context whose active span is this one: what the calls made while it is decided run
    /// under.
    pub(crate) fn context(&self) -> &Context {
        &self.cx
    }

    /// Admitted: its tenant, plan, the units its route took and the policy in force
    /// (`RateLimit-Policy`'s value).
    pub(crate) fn admitted(mut self, tenant: &str, plan: &str, units: u64, policy: Option<&str>) {
        let span = self.cx.span();
        span.set_attributes([
            KeyValue::new("tollgate.decision", "admitted"),
            KeyValue::new("tollgate.tenant", tenant.to_owned()),
            KeyValue::new("tollgate.plan", plan.to_owned()),
            KeyValue::new("tollgate.units", i64::try_from(units).unwrap_or(i64::MAX)),
        ]);
        if let Some(p) = policy {
            span.set_attribute(KeyValue::new("tollgate.policy", p.to_owned()));
        }
        self.end();
    }

    /// Refused: why (`RejectionKind`'s name), the status answered, its tenant and plan if
    /// known, the policy that refused it. A 5xx (the store down) is an error of the span; a
    /// 4xx is the client's, not the server's (the HTTP conventions).
    pub(crate) fn refused(
        mut self,
        kind: &'static str,
        status: u16,
        tenant: Option<&str>,
        plan: Option<&str>,
        policy: Option<&str>,
    ) {
        let span = self.cx.span();
        span.set_attributes([
            KeyValue::new("tollgate.decision", "refused"),
            KeyValue::new("tollgate.refusal", kind),
            KeyValue::new("http.response.status_code", i64::from(status)),
        ]);
        for (key, value) in [("tollgate.tenant", tenant), ("tollgate.plan", plan), ("tollgate.policy", policy)] {
            if let Some(v) = value {
                span.set_attribute(KeyValue::new(key, v.to_owned()));
            }
        }
        if status >= 500 {
            span.set_attribute(KeyValue::new("error.type", kind));
            span.set_status(Status::error(kind));
        }
        self.end();
    }

    fn end(&mut self) {
        if !self.ended {
            self.ended = true;
            self.cx.span().end();
        }
    }
}

impl Drop for RequestSpan {
    fn drop(&mut self) {
        if !self.ended {
            self.cx.span().set_attribute(KeyValue::new("tollgate.decision", "abandoned"));
            self.end();
        }
    }
}

/// A span of a pass of tollgate's own (an export), a root unless the caller's context has
/// one: the calls made under it are its children.
pub(crate) fn pass_context(name: &'static str) -> Context {
    let tracer = global::tracer(TRACER);
    let parent = Context::current();
    let span = tracer.span_builder(name).with_kind(SpanKind::Internal).start_with_context(&tracer, &parent);
    parent.with_span(span)
}

/// Ends the span of `cx` (made by [`pass_context`]), an error if `failed` says why.
pub(crate) fn end_pass(cx: &Context, failed: Option<&str>) {
    let span = cx.span();
    if let Some(why) = failed {
        span.set_status(Status::error(why.to_owned()));
    }
    span.end();
}

/// A call out of the process (a store, a billing system) made under the current context's
/// span: its child span, of kind client, with its attributes, ended with the call's outcome
/// (`cancelled` when dropped before: a deadline, a client gone). Under no span (a call of the
/// background path outside a pass), no span is made, and its attributes are never built.
#[derive(Debug)]
pub(crate) struct CallSpan {
    cx: Option<Context>,
}

impl CallSpan {
    /// A child of the current span named `name`, if there is a current span.
    pub(crate) fn start(name: impl Into<Cow<'static, str>>, attributes: impl FnOnce() -> Vec<KeyValue>) -> Self {
        let parent = Context::current();
        if !parent.has_active_span() {
            return Self { cx: None };
        }
        let tracer = global::tracer(TRACER);
        let span: BoxedSpan = tracer
            .span_builder(name)
            .with_kind(SpanKind::Client)
            .with_attributes(attributes())
            .start_with_context(&tracer, &parent);
        Self { cx: Some(parent.with_span(span)) }
    }

    /// The context the call runs under (its own span active), if a span was made.
    pub(crate) fn context(&self) -> Option<&Context> {
        self.cx.as_ref()
    }

    /// Ends it: `outcome` (`ok`, or why it failed) as `tollgate.outcome`, an error status
    /// unless `ok`.
    pub(crate) fn end(mut self, outcome: &'static str) {
        self.close(outcome);
    }

    fn close(&mut self, outcome: &'static str) {
        if let Some(cx) = self.cx.take() {
            let span = cx.span();
            span.set_attribute(KeyValue::new("tollgate.outcome", outcome));
            if outcome != "ok" {
                span.set_attribute(KeyValue::new("error.type", outcome));
                span.set_status(Status::error(outcome));
            }
            span.end();
        }
    }
}

impl Drop for CallSpan {
    fn drop(&mut self) {
        self.close("cancelled");
    }
}

/// The value of `db.system` for a store, from its type's name as its `Debug` begins
/// (`SqliteStore`, `PostgresStore`, `DynamoStore`, `RedisStore`, `MemoryStore`): read once,
/// when its calls are wrapped.
pub(crate) fn db_system<D: std::fmt::Debug + ?Sized>(debug: &D) -> &'static str {
    use std::fmt::Write;
    /// The first 64 bytes of a `Debug` (a memory store's would print every row).
    struct Head(String);
    impl Write for Head {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let room = 64usize.saturating_sub(self.0.len());
            let take = s.char_indices().map(|(i, c)| i + c.len_utf8()).take_while(|&end| end <= room).last();
            self.0.push_str(&s[..take.unwrap_or(0)]);
            if s.len() > room {
                Err(std::fmt::Error)
            } else {
                Ok(())
            }
        }
    }
    let mut head = Head(String::new());
    let _ = write!(head, "{debug:?}");
    // A wrapper's (the engine's time limits, a test's faults) names the store it wraps.
    let name = &head.0;
    [
        ("SqliteStore", "sqlite"),
        ("PostgresStore", "postgresql"),
        ("DynamoStore", "aws.dynamodb"),
        ("RedisStore", "redis"),
        ("MemoryStore", "memory"),
    ]
    .into_iter()
    .find(|(ty, _)| name.contains(ty))
    .map_or("other", |(_, system)| system)
}
