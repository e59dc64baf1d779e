//! `huse-run compare RUN RUN...`: the params and metrics that differ, side by side.

use anyhow::{Context as _, Result};
use clap::Args;
use huse_report::table::{self, Format};
use huse_store::Filter;

use super::{Global, open_for_queries, run_id};

/// `compare`'s arguments.
#[derive(Args, Debug)]
pub struct CompareArgs {
    /// The runs (ids in the database), two or more.
    #[arg(required = true, num_args = 2.., value_parser = run_id)]
    pub runs: Vec<i64>,
    /// Metrics to show (glob, repeatable), whether they differ or not. Without it: the
    /// metrics that differ between the runs — in a table for the terminal only the stages'
    /// headline ones (--all for every one).
    #[arg(long = "metric", short = 'm', value_name = "GLOB")]
    pub metrics: Vec<String>,
    /// Every metric that differs, not only the headline ones.
    #[arg(long)]
    pub all: bool,
    /// table, csv, json or markdown.
    #[arg(long, short = 'f', default_value = "table")]
    pub format: Format,
}

/// Prints the comparison table.
pub async fn run(g: &Global, a: CompareArgs) -> Result<i32> {
    let store = open_for_queries(g).await?;
    let all = store.load_runs(&Filter::default()).await?;
    let mut chosen = Vec::new();
    for id in &a.runs {
        chosen.push(all.iter().find(|r| r.id == *id).cloned().with_context(|| format!("no run with id {id}"))?);
    }
    let compact = a.format == Format::Table && a.metrics.is_empty() && !a.all;
    let only_differing = a.metrics.is_empty();
    let globs = if compact { crate::builtin_registry().headline() } else { a.metrics.clone() };
    let t = table::compare_table(&chosen, &table::patterns(&globs)?, only_differing);
    print!("{}", t.render(a.format));
    if compact {
        let differing = table::compared_metrics(&chosen, &[], true).len();
        let shown = table::compared_metrics(&chosen, &table::patterns(&globs)?, true).len();
        if differing > shown {
            println!("({} more metric(s) differ; -m GLOB or --all)", differing - shown);
        }
    }
    Ok(0)
}
