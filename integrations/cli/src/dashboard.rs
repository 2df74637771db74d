//! `tollgate dashboard`: the read-only operator dashboard over the configuration's stores,
//! served until SIGINT or SIGTERM.

use std::{net::SocketAddr, path::Path};

use tollgate::{
    admin::Admin,
    config::DashboardToken,
    dashboard::{Access, Dashboard},
    Config,
};

use crate::util::Result;

/// The access rule: the token of `--token-file`, else the configuration's; without one, only
/// a loopback address is served (anyone on the machine may read it, as they may read the
/// store's file).
pub(crate) fn access(config: &Config, listen: SocketAddr, token_file: Option<&Path>) -> Result<Access> {
    let token = match token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            Some(DashboardToken::new(&text).map_err(|why| format!("{} must hold {why}", path.display()))?)
        }
        None => config.dashboard().token.clone(),
    };
    match token {
        Some(token) => Ok(Access::Token(token)),
        None if listen.ip().is_loopback() => Ok(Access::Loopback),
        None => Err(format!(
            "refusing to serve the dashboard on {listen} without an access token: every tenant's figures would be \
             open to the network; give --token-file (or [dashboard] token_file), or listen on a loopback address"
        )
        .into()),
    }
}

pub(crate) async fn serve(config: Config, listen: SocketAddr, token_file: Option<&Path>) -> Result<()> {
    let access = access(&config, listen, token_file)?;
    let open = matches!(access, Access::Loopback);
    let dashboard = Dashboard::new(Admin::open(&config).await?, access);
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let bound = listener.local_addr()?;
    out!(
        "tollgate dashboard on http://{bound}/ ({})",
        if open { "loopback, no token" } else { "access token required" }
    );
    let app: axum::Router = tollgate_axum::dashboard("", dashboard);
    axum::serve(listener, app).with_graceful_shutdown(tollgate_axum::shutdown_signal()).await?;
    Ok(())
}
