//! `tollgate dashboard`: the read-only operator dashboard over the configuration's stores,
//! served until SIGINT or SIGTERM.

use std::{net::SocketAddr, path::Path};

use tollgate::{
    config::{DashboardToken, StoreRole, StoreSettings},
    dashboard::{Access, Dashboard},
    Config,
};

use crate::util::Result;

/// The access rule: the token of `--token-file`, else the configuration's. Without one, only a
/// loopback address over stores that are local files (SQLite, or memory) is served: anyone on
/// the machine may read the file anyway. A shared store (PostgreSQL, DynamoDB, Redis) is read
/// with the operator's credentials, which other users of the machine do not have, so it needs
/// a token on loopback too.
pub(crate) fn access(config: &Config, listen: SocketAddr, token_file: Option<&Path>) -> Result<Access> {
    let token = match token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            Some(DashboardToken::new(&text).map_err(|why| format!("{} must hold {why}", path.display()))?)
        }
        None => config.dashboard().token.clone(),
    };
    let shared = StoreRole::ALL
        .into_iter()
        .map(|role| config.store_of(role))
        .find(|s| !matches!(s, StoreSettings::Sqlite { .. } | StoreSettings::Memory));
    match (token, shared) {
        (Some(token), _) => Ok(Access::Token(token)),
        (None, None) if listen.ip().is_loopback() => Ok(Access::Loopback),
        (None, None) => Err(format!(
            "refusing to serve the dashboard on {listen} without an access token: every tenant's figures would be \
             open to the network; give --token-file (or [dashboard] token_file; `openssl rand -hex 32` makes one), \
             or listen on a loopback address"
        )
        .into()),
        (None, Some(store)) => Err(format!(
            "refusing to serve the dashboard without an access token: its store ({}) is shared, and every user and \
             web page of this machine could read every tenant through 127.0.0.1; give --token-file (or [dashboard] \
             token_file; `openssl rand -hex 32` makes one)",
            store.kind()
        )
        .into()),
    }
}

pub(crate) async fn serve(config: Config, listen: SocketAddr, token_file: Option<&Path>) -> Result<()> {
    let access = access(&config, listen, token_file)?;
    let open = matches!(access, Access::Loopback);
    let dashboard = Dashboard::new(crate::util::open_admin(&config).await?, access);
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let bound = listener.local_addr()?;
    out!(
        "tollgate dashboard on http://{bound}/ ({})",
        if open { "loopback, no token" } else { "access token required" }
    );
    let app: axum::Router = tollgate_axum::dashboard("", dashboard);
    // The peer's address, for the limit on wrong tokens per address.
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(tollgate_axum::shutdown_signal())
        .await?;
    Ok(())
}
