//! `huse-run report EXPERIMENT`: an HTML page with figures, from the database alone.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::{Global, open_for_queries};

/// `report`'s arguments.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// The experiment (its name).
    pub experiment: String,
    /// Output folder (default: report-EXPERIMENT).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Final metrics to show and plot (glob, repeatable; default test.* when present, else all).
    #[arg(long = "metric", short = 'm', value_name = "GLOB")]
    pub metrics: Vec<String>,
}

/// Writes the report and prints where.
pub async fn run(g: &Global, a: ReportArgs) -> Result<i32> {
    let store = open_for_queries(g).await?;
    let out = a.out.unwrap_or_else(|| huse_report::default_out(&a.experiment));
    let figs = huse_report::report(&store, &a.experiment, &out, &a.metrics).await?;
    println!("{} ({} figures)", out.join("index.html").display(), figs.len());
    Ok(0)
}
