//! `huse-run ui`: the results app over the results database (see `huse-ui`), on this machine
//! by default; on another address only with a token.

use anyhow::Result;
use clap::Args;

use super::{Global, open_for_queries};

/// `ui`'s arguments.
#[derive(Args, Debug)]
pub struct UiArgs {
    /// Port (0: any free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Address to bind; the default serves this machine only. Any other needs --token.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// A token every request must carry (?token=T once, or `Authorization: Bearer T`).
    #[arg(long, env = "HUSE_UI_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Serves the app until the process ends.
pub async fn run(g: &Global, a: UiArgs) -> Result<i32> {
    if !a.host.is_loopback() {
        match &a.token {
            None => {
                eprintln!(
                    "error: --host {} serves the results to other machines: give a --token (or HUSE_UI_TOKEN) that every request must carry",
                    a.host
                );
                return Ok(2);
            }
            Some(t) if t.len() < 16 => {
                eprintln!("error: --token must be at least 16 characters");
                return Ok(2);
            }
            Some(_) => eprintln!(
                "warning: serving the results database on {} to other machines; requests need the token",
                a.host
            ),
        }
    }
    let store = open_for_queries(g).await?;
    let settings = huse_ui::Settings { headline: crate::builtin_registry().headline(), token: a.token.clone() };
    let app = huse_ui::app(store, settings);
    let with_token = a.token.as_ref().map(|t| format!("?token={t}")).unwrap_or_default();
    huse_serve::serve_router(app, std::net::SocketAddr::new(a.host, a.port), huse_serve::Limits::default(), |addr| {
        println!("results of {} on http://{addr}/{with_token} (Ctrl-C to stop)", g.db);
    })
    .await?;
    Ok(0)
}
