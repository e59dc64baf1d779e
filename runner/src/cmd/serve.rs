//! `huse-run serve RUN [RUN...]`: the local search page over trained runs.

use anyhow::Result;
use clap::Args;

use huse_store::Store;

use super::{Global, device_arg, open_for_queries, run_files, run_id};

/// `serve`'s arguments.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The runs (ids in the database); their results are shown side by side.
    #[arg(required = true, value_parser = run_id)]
    pub runs: Vec<i64>,
    /// Port (0: any free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Address to bind; the default serves this machine only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Where the encoders and towers run: auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Loads the runs and serves them until the process ends.
pub async fn run(g: &Global, a: ServeArgs) -> Result<i32> {
    let store = open_for_queries(g).await?;
    let mut views = Vec::new();
    for run in &a.runs {
        views.push(run_view(g, &store, *run, &a.device).await?);
    }
    store.close().await;
    let n = a.runs.len();
    huse_serve::serve(views, std::net::SocketAddr::new(a.host, a.port), |addr| {
        println!("serving {n} run(s) on http://{addr}/ (Ctrl-C to stop)");
    })
    .await?;
    Ok(0)
}

/// A trained run as the search page shows it: its searcher (the run's own encoders, towers and
/// item index, built once in the cache's `.index/`), named with its headline figures.
pub async fn run_view(g: &Global, store: &Store, run: i64, device: &str) -> Result<huse_serve::RunView> {
    let files = run_files(store, run).await?;
    let row = store.run(run).await?;
    // What to expect of its search: the stages' headline figures, beside its name.
    let figures: Vec<String> = crate::builtin_registry()
        .headline()
        .iter()
        .filter_map(|k| row.metrics.get(k).copied().flatten().map(|v| format!("{k} {v:.3}")))
        .collect();
    let name = if figures.is_empty() { row.run.name } else { format!("{} ({})", row.run.name, figures.join(", ")) };
    let index = g.cache.join(".index");
    let dev = device_arg(device)?;
    let searcher = tokio::task::spawn_blocking(move || huse_search::Searcher::open(&files, &index, &dev)).await??;
    huse_serve::RunView::new(format!("#{run} {name}"), searcher)
}
