//! The server of `scripts/load.sh`: hello world over actix-web with one worker, bare or behind
//! tollgate's middleware, for tenants `key-0` … `key-{N-1}` (rate limit, a hard daily quota,
//! usage recorded and flushed to a memory store by the worker).
//!
//! ```text
//! cargo run --release -p tollgate-actix --example load_actix -- tollgate 10000 127.0.0.1:8000
//! ```
#![allow(missing_docs)]

use actix_web::{web, App, HttpServer};

/// The configuration for `tenants` tenants (the same as the axum load server, load_axum's).
fn config(tenants: usize) -> String {
    let mut toml = String::from(
        "[store]\nkind = \"memory\"\n[limits]\nheaders = \"HEADERS\"\n[plans.p]\nrate = \"100000000/s\"\nburst = 100000000\n\
         quotas.requests = { limit = 1000000000, period = \"day\", mode = \"hard\" }\n",
    );
    for i in 0..tenants {
        toml.push_str(&format!("[tenants.t{i}]\nplan = \"p\"\nkeys = [\"key-{i}\"]\n"));
    }
    toml.replace("HEADERS", &std::env::var("TOLLGATE_HEADERS").unwrap_or_else(|_| "draft".into()))
}

#[actix_web::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (mode, tenants, addr) = match &args[1..] {
        [mode, tenants, addr] => (mode.clone(), tenants.parse::<usize>()?, addr.clone()),
        _ => return Err("usage: load_actix bare|tollgate TENANTS ADDR".into()),
    };
    let engine = match mode.as_str() {
        "bare" => None,
        "tollgate" => {
            let (engine, worker) =
                tollgate::Tollgate::builder(tollgate::Config::from_toml_str(&config(tenants))?).open().await?;
            tokio::spawn(worker.run());
            Some(engine)
        }
        other => return Err(format!("unknown mode {other}").into()),
    };
    let hello = || async { "Hello, World!" };
    println!("ready");
    match engine {
        None => {
            HttpServer::new(move || App::new().route("/", web::get().to(hello))).workers(1).bind(&addr)?.run().await?
        }
        Some(engine) => {
            HttpServer::new(move || {
                App::new()
                    .wrap(tollgate_actix::TollgateMiddleware::new(engine.clone()))
                    .route("/", web::get().to(hello))
            })
            .workers(1)
            .bind(&addr)?
            .run()
            .await?
        }
    }
    Ok(())
}
