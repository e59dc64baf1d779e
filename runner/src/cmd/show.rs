//! `huse-run show RUN`: everything about one run — params, stages, metrics, summaries.

use anyhow::Result;
use clap::Args;
use huse_report::table::{self, Format};

use super::{Global, open_for_queries, run_id};

/// `show`'s arguments.
#[derive(Args, Debug)]
pub struct ShowArgs {
    /// The run (its id in the database).
    #[arg(value_parser = run_id)]
    pub run: i64,
    /// table, csv, json or markdown.
    #[arg(long, short = 'f', default_value = "table")]
    pub format: Format,
}

/// Prints the run's sections (and its summaries, as text formats).
pub async fn run(g: &Global, a: ShowArgs) -> Result<i32> {
    let store = open_for_queries(g).await?;
    print!("{}", table::render_sections(&table::show(&store, a.run).await?, a.format));
    if matches!(a.format, Format::Table | Format::Markdown) {
        print!("{}", table::summaries_text(&store, a.run).await?);
    }
    Ok(0)
}
