//! An AI completion API sold from a prepaid balance of tokens: each request holds its
//! `max_tokens` before the model runs, streams the generated tokens as server-sent events
//! (billing each token before it is sent), and stops when the balance runs out. What is billed
//! is exactly what was streamed; what was held and not streamed goes back to the balance.
//!
//! Run it:
//!
//! ```text
//! cargo run -p tollgate-axum --example ai_stream
//! ```
//!
//! It listens on `127.0.0.1:$PORT` (3000 by default) with the configuration below (its balance
//! in this process's memory), or the file named by `TOLLGATE_CONFIG`: on a store a fleet
//! shares (`[store] kind = "postgres"` with `DATABASE_URL`, built with `--features
//! tollgate/postgres`; docs/postgres.md), several processes on their own ports stream from one
//! balance, and the demo grant is made once whichever starts first (its id is `demo-grant`).
//!
//! Try, from another terminal (the demo tenant starts with a balance of 300 tokens):
//!
//! ```text
//! curl -N localhost:3000/v1/completions -H 'x-api-key: tg_prepaid_acme' \
//!     -H 'content-type: application/json' -d '{"prompt": "tell me a story", "max_tokens": 120}'
//! # 120 token events, then `done` with {"tokens":120}; the same again: 120 and `done`; the
//! # third call holds the 60 tokens left, streams them, and ends with `stopped` (the balance
//! # is spent); the fourth gets 402 before any work.
//! ```
#![allow(missing_docs)]

use std::convert::Infallible;

use axum::{
    response::{
        sse::{Event, Sse},
        IntoResponse, Response,
    },
    routing::post,
    Json, Router,
};
use futures_util::stream::{self, Stream};
use tollgate::{Hold, Overrun};
use tollgate_axum::{RejectionResponse, Tenant};

pub(crate) const CONFIG: &str = r#"
[store]
kind = "memory"

[meters.requests]
[meters.tokens]

[plans.prepaid]
rate = "20/s"
burst = 20
quotas.tokens = { period = "prepaid" }

[[routes]]
method = "POST"
path = "/v1/completions"
reports = ["tokens"]

[tenants.acme]
plan = "prepaid"
keys = ["tg_prepaid_acme"]
"#;

/// When the balance cannot cover a request's whole `max_tokens`, it streams what the balance
/// allows, holding this many more at a time.
pub(crate) const CHUNK: u64 = 32;

#[derive(serde::Deserialize)]
pub(crate) struct Completion {
    pub(crate) prompt: String,
    pub(crate) max_tokens: u64,
}

/// The application: the completion route behind tollgate.
pub(crate) fn app(engine: tollgate::Tollgate) -> Router {
    Router::new().route("/v1/completions", post(complete)).layer(tollgate::TollgateLayer::new(engine))
}

async fn complete(Tenant(ctx): Tenant, Json(req): Json<Completion>) -> Response {
    let _ = &req.prompt;
    if req.max_tokens == 0 {
        return (http::StatusCode::BAD_REQUEST, "max_tokens must be at least 1\n").into_response();
    }
    // Hold the most the completion may use before the model runs. A balance that cannot
    // cover it all still serves what it holds, a chunk at a time; one that holds nothing is
    // refused (402) before any work.
    let hold = match ctx.hold_with("tokens", req.max_tokens, Overrun::Refuse).await {
        Ok(hold) => hold,
        Err(_) => match ctx.hold_with("tokens", CHUNK.min(req.max_tokens), Overrun::Refuse).await {
            Ok(hold) => hold,
            Err(rejection) => return RejectionResponse(rejection).into_response(),
        },
    };
    Sse::new(stream_tokens(hold, model(&req.prompt).take(req.max_tokens as usize))).into_response()
}

/// What the stream carries between events.
struct Streaming<I> {
    hold: Option<Hold>,
    tokens: I,
    sent: u64,
}

/// Streams `tokens`, each billed through `hold` before it is sent: past the hold, more is
/// held (a chunk); a refused extension ends the stream with a `stopped` event. The hold
/// settles at the end (what it did not record goes back), or when the client goes away (the
/// stream, and the hold with it, is dropped).
fn stream_tokens(
    hold: Hold,
    tokens: impl Iterator<Item = String> + Send + 'static,
) -> impl Stream<Item = Result<Event, Infallible>> + Send {
    stream::unfold(Streaming { hold: Some(hold), tokens, sent: 0 }, |mut s| async move {
        let hold = s.hold.as_mut()?;
        let Some(token) = s.tokens.next() else {
            let sent = s.sent;
            s.hold.take()?.settle();
            return Some((Ok(Event::default().event("done").data(format!("{{\"tokens\":{sent}}}"))), s));
        };
        if hold.record(1).is_err() {
            // Past the hold: ask for more while the balance allows (a chunk, else the last
            // units one at a time: a chunk larger than what is left is refused whole).
            let extended = match hold.extend(CHUNK).await {
                Ok(()) => Ok(()),
                Err(_) => hold.extend(1).await,
            };
            if let Err(rejection) = extended {
                let sent = s.sent;
                s.hold.take()?.settle();
                let why = format!("{{\"tokens\":{sent},\"reason\":{:?}}}", rejection.detail());
                return Some((Ok(Event::default().event("stopped").data(why)), s));
            }
            hold.record(1).expect("just held");
        }
        s.sent += 1;
        Some((Ok(Event::default().data(token)), s))
    })
}

/// A stand-in for a language model: an endless stream of words.
fn model(prompt: &str) -> impl Iterator<Item = String> + Send + 'static {
    let words: Vec<String> = prompt.split_whitespace().map(str::to_owned).collect();
    let words = if words.is_empty() { vec!["…".to_owned()] } else { words };
    words.into_iter().cycle()
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `TOLLGATE_CONFIG` names a file (a store the fleet shares); else the one above.
    let config = match std::env::var_os("TOLLGATE_CONFIG") {
        Some(path) => tollgate::Config::from_path(std::path::Path::new(&path))?,
        None => tollgate::Config::from_toml_str(CONFIG)?,
    };
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(3000);
    let (engine, worker) = tollgate::Tollgate::builder(config).open().await?;
    let worker = tokio::spawn(worker.run());
    // The demo tenant's balance: in production, a payment grants it (`[stripe.credits]`), or
    // `tollgate credits grant acme tokens 300`.
    tollgate::admin::Admin::for_engine(&engine).grant_credits("acme", "tokens", 300, None, "demo-grant").await?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://127.0.0.1:{port} (Ctrl-C or SIGTERM to stop)");
    axum::serve(listener, app(engine.clone())).with_graceful_shutdown(tollgate_axum::shutdown_signal()).await?;
    let report = engine.shutdown().await?;
    println!("flushed {} usage records", report.flush.records);
    worker.await?;
    Ok(())
}
