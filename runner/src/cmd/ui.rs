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
    /// Where a trained run's search page runs its encoders and towers: auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Trained runs' search pages, as `huse-run serve` makes them.
struct Searches {
    g: Global,
    store: huse_store::Store,
    device: String,
    /// The runs found to have a model.
    models: tokio::sync::Mutex<std::collections::HashSet<i64>>,
    /// Each run's item images by item id (its ingest stage's items), as asked for.
    images: tokio::sync::Mutex<std::collections::HashMap<i64, std::sync::Arc<ItemImages>>>,
}

type ItemImages = std::collections::HashMap<String, std::path::PathBuf>;

/// A run's item images by id, from its ingest stage's items.
async fn item_images(store: &huse_store::Store, id: i64) -> anyhow::Result<ItemImages> {
    let files = super::run_files(store, id).await?;
    let path = files.ingest_dir.join(huse_data::Artifact::Items);
    let items = tokio::task::spawn_blocking(move || huse_data::read_items(&path)).await??;
    Ok(items.into_iter().map(|it| (it.id, std::path::PathBuf::from(it.image))).collect())
}

impl huse_ui::SearchApps for Searches {
    fn has_model(&self, id: i64) -> huse_ui::BoxFuture<'_, bool> {
        Box::pin(async move {
            if self.models.lock().await.contains(&id) {
                return true;
            }
            // A run still training has no model yet: only a found one is remembered.
            let has = super::run_files(&self.store, id).await.is_ok();
            if has {
                self.models.lock().await.insert(id);
            }
            has
        })
    }

    fn item_image(&self, id: i64, item: String) -> huse_ui::BoxFuture<'_, Option<std::path::PathBuf>> {
        Box::pin(async move {
            let mut known = self.images.lock().await;
            if let std::collections::hash_map::Entry::Vacant(e) = known.entry(id) {
                e.insert(std::sync::Arc::new(item_images(&self.store, id).await.unwrap_or_default()));
            }
            known.get(&id).and_then(|m| m.get(&item).cloned())
        })
    }

    fn app(&self, id: i64, base: String) -> huse_ui::BoxFuture<'_, anyhow::Result<huse_ui::Router>> {
        Box::pin(async move {
            let view = super::serve::run_view(&self.g, &self.store, id, &self.device).await?;
            Ok(huse_serve::app_at(vec![view], &base))
        })
    }
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
    let search = Searches {
        g: g.clone(),
        store: open_for_queries(g).await?,
        device: a.device.clone(),
        models: Default::default(),
        images: Default::default(),
    };
    let settings = huse_ui::Settings {
        headline: crate::builtin_registry().headline(),
        token: a.token.clone(),
        search: Some(std::sync::Arc::new(search)),
    };
    let app = huse_ui::app(store, settings);
    let with_token = a.token.as_ref().map(|t| format!("?token={t}")).unwrap_or_default();
    huse_serve::serve_router(app, std::net::SocketAddr::new(a.host, a.port), huse_serve::Limits::default(), |addr| {
        println!("results of {} on http://{addr}/{with_token} (Ctrl-C to stop)", g.db);
    })
    .await?;
    Ok(0)
}
