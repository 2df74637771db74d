//! The server of `scripts/load.sh`: hello world over axum, bare or behind tollgate, on one
//! tokio thread, for tenants `key-0` … `key-{N-1}` (rate limit, a hard daily quota, usage
//! recorded and flushed to a memory store by the worker).
//!
//! ```text
//! cargo run --release -p tollgate-axum --example load_axum -- tollgate 10000 127.0.0.1:8000
//! ```
#![allow(missing_docs)]

use axum::{routing::get, Router};

/// The configuration for `tenants` tenants, as the load script's servers share it.
#[must_use]
pub fn config(tenants: usize) -> String {
    let mut toml = String::from(
        "[store]\nkind = \"memory\"\n[limits]\nheaders = \"HEADERS\"\n[plans.p]\nrate = \"100000000/s\"\nburst = 100000000\n\
         quotas.requests = { limit = 1000000000, period = \"day\", mode = \"hard\" }\n",
    );
    for i in 0..tenants {
        toml.push_str(&format!("[tenants.t{i}]\nplan = \"p\"\nkeys = [\"key-{i}\"]\n"));
    }
    toml.replace("HEADERS", &std::env::var("TOLLGATE_HEADERS").unwrap_or_else(|_| "draft".into()))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (mode, tenants, addr) = match &args[1..] {
        [mode, tenants, addr] => (mode.clone(), tenants.parse::<usize>()?, addr.clone()),
        _ => return Err("usage: load_axum bare|tollgate TENANTS ADDR".into()),
    };
    let app = Router::new().route("/", get(|| async { "Hello, World!" }));
    let app = match mode.as_str() {
        "bare" => app,
        "tollgate" => {
            let (engine, worker) =
                tollgate::Tollgate::builder(tollgate::Config::from_toml_str(&config(tenants))?).open().await?;
            tokio::spawn(worker.run());
            app.layer(tollgate::TollgateLayer::new(engine))
        }
        other => return Err(format!("unknown mode {other}").into()),
    };
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("ready");
    axum::serve(listener, app).await?;
    Ok(())
}
