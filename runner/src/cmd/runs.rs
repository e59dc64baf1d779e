//! `huse-run runs`: the runs that pass a filter, with their varying params and final
//! metrics (or grouped over seeds: mean ± std).

use anyhow::Result;
use clap::Args;
use huse_report::table::{self, Format};

use super::{FilterArgs, Global, open_for_queries};

/// `runs`'s arguments.
#[derive(Args, Debug)]
pub struct RunsArgs {
    /// Which runs to list.
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Metrics to show (glob, repeatable; default all).
    #[arg(long = "metric", short = 'm', value_name = "GLOB")]
    pub metrics: Vec<String>,
    /// Sort by a column (param, metric, id, name, status).
    #[arg(long)]
    pub sort: Option<String>,
    /// Sort descending.
    #[arg(long)]
    pub desc: bool,
    /// At most this many rows.
    #[arg(long)]
    pub limit: Option<usize>,
    /// One row per param combination (seeds pooled): mean ± std of each metric.
    #[arg(long)]
    pub group: bool,
    /// table, csv, json or markdown.
    #[arg(long, short = 'f', default_value = "table")]
    pub format: Format,
}

/// Prints the runs table.
pub async fn run(g: &Global, a: RunsArgs) -> Result<i32> {
    let store = open_for_queries(g).await?;
    a.filter.check(&store).await?;
    let runs = store.load_runs(&a.filter.filter()).await?;
    let mut t = table::runs_table(&runs, &table::patterns(&a.metrics)?, a.group);
    if let Some(s) = a.sort {
        t.sort_by(&s, a.desc)?;
    } else if a.desc {
        t.rows.reverse();
    }
    if let Some(n) = a.limit {
        t.rows.truncate(n);
    }
    print!("{}", t.render(a.format));
    Ok(0)
}
