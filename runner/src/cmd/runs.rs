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
    /// Exactly these columns, in this order (comma-separated: `id,train.beta,test.acc.both`;
    /// any param that varies, any metric, or id, name, status, experiment).
    #[arg(long, value_delimiter = ',', value_name = "COL,...")]
    pub columns: Vec<String>,
    /// Every column (all metrics), however wide. Without it (and without `-m`), a table for
    /// the terminal shows the varying params and the stages' headline metrics and fits the
    /// terminal's width (80 columns when not a terminal).
    #[arg(long)]
    pub all: bool,
}

/// Prints the runs table.
pub async fn run(g: &Global, a: RunsArgs) -> Result<i32> {
    let store = open_for_queries(g).await?;
    let runs = a.filter.load(&store).await?;
    // The short default: what the stages call their headline metrics, within the terminal.
    let compact = a.format == Format::Table && a.metrics.is_empty() && !a.all && a.columns.is_empty();
    let globs = if compact { crate::builtin_registry().headline() } else { a.metrics.clone() };
    let mut t = table::runs_table(&runs, &table::patterns(&globs)?, a.group);
    if let Some(s) = &a.sort {
        t.sort_by(s, a.desc)?;
    } else if a.desc {
        t.rows.reverse();
    }
    if let Some(n) = a.limit {
        t.rows.truncate(n);
    }
    if !a.columns.is_empty() {
        if let Err(e) = t.select(&a.columns) {
            eprintln!("error: --columns: {e}");
            return Ok(2);
        }
        print!("{}", t.render(a.format));
        return Ok(0);
    }
    let metrics: std::collections::BTreeSet<&String> = runs.iter().flat_map(|r| r.metrics.keys()).collect();
    // For the eye, a metric with one value in every row is one line above the table.
    let folded = if a.format == Format::Table { t.fold_constant(&metrics) } else { Vec::new() };
    {
        if !folded.is_empty() {
            let line: Vec<String> = folded.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let line = format!("same in every row: {}", line.join(", "));
            let width = super::terminal_width();
            match (compact, line.chars().count() > width) {
                (true, true) => println!("{}...", line.chars().take(width.saturating_sub(3)).collect::<String>()),
                _ => println!("{line}"),
            }
        }
    }
    if !compact {
        print!("{}", t.render(a.format));
        return Ok(0);
    }
    // One experiment: its name starts every run's name; and with the varying params in
    // their own columns, the name (EXPERIMENT@params) says nothing more.
    if !a.group && runs.windows(2).all(|w| w[0].experiment == w[1].experiment) {
        t.remove_column("experiment");
        if t.headers.len() > 3 + t.headers.iter().filter(|h| runs.iter().any(|r| r.metrics.contains_key(*h))).count() {
            t.remove_column("name");
        }
    }
    let dropped = t.fit(super::terminal_width(), 3);
    print!("{}", t.render(Format::Table));
    let hidden_metrics =
        metrics.iter().filter(|m| !t.headers.contains(m) && !folded.iter().any(|(k, _)| k == **m)).count();
    let hidden_other = dropped.iter().filter(|d| !metrics.contains(d)).count();
    if hidden_metrics + hidden_other > 0 {
        println!(
            "({hidden_metrics} more metric(s){} not shown; -m GLOB or --all)",
            if hidden_other > 0 { format!(" and {hidden_other} param column(s)") } else { String::new() }
        );
    }
    Ok(0)
}
