//! `huse-run best --metric KEY`: the run with the best final value of a metric.

use anyhow::Result;
use clap::Args;
use huse_report::table::{self, Format};

use super::{FilterArgs, Global, open_for_queries};

/// `best`'s arguments.
#[derive(Args, Debug)]
pub struct BestArgs {
    /// The metric to rank the runs by (a final value, e.g. `test.acc.both`).
    #[arg(long, short = 'm')]
    pub metric: String,
    /// Lower is better.
    #[arg(long)]
    pub min: bool,
    /// The best sweep point by the metric's mean over its seeds (mean ± std and the run
    /// count), instead of the best single run.
    #[arg(long)]
    pub group: bool,
    /// Which runs compete.
    #[command(flatten)]
    pub filter: FilterArgs,
    /// table, csv, json or markdown.
    #[arg(long, short = 'f', default_value = "table")]
    pub format: Format,
}

/// Prints the best run.
pub async fn run(g: &Global, a: BestArgs) -> Result<i32> {
    let store = open_for_queries(g).await?;
    let runs = a.filter.load(&store).await?;
    let t = if a.group {
        table::best_group_table(&runs, &a.metric, a.min)?
    } else {
        table::best_table(&runs, &a.metric, a.min)?
    };
    print!("{}", t.render(a.format));
    Ok(0)
}
