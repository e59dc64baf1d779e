//! `huse-run search RUN "a sentence"` (or `--image FILE`): the items of a trained run
//! nearest to a query.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use huse_report::table::{Cell, Format, Table};

use super::{Global, device_arg, open_for_queries, run_files, run_id};

/// `search`'s arguments.
#[derive(Args, Debug)]
pub struct SearchArgs {
    /// The run (its id in the database).
    #[arg(value_parser = run_id)]
    pub run: i64,
    /// A text query, e.g. "red floral summer dress" (the same as --text).
    #[arg(value_name = "TEXT", conflicts_with_all = ["text", "image"])]
    pub query: Option<String>,
    /// A text query, e.g. "red floral summer dress".
    #[arg(long, conflicts_with = "image", required_unless_present_any = ["image", "query"])]
    pub text: Option<String>,
    /// An image query (JPEG or PNG).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// How many results.
    #[arg(short, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub k: u32,
    /// Search the items' image or text embeddings.
    #[arg(long, default_value = "image")]
    pub modality: huse_search::Modality,
    /// Where the encoders and towers run: auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// table, csv, json or markdown.
    #[arg(long, short = 'f', default_value = "table")]
    pub format: Format,
}

/// Prints the nearest items.
pub async fn run(g: &Global, a: SearchArgs) -> Result<i32> {
    let text = a.text.or(a.query);
    let store = open_for_queries(g).await?;
    let files = run_files(&store, a.run).await?;
    store.close().await;
    let searcher = huse_search::Searcher::open(&files, &g.cache.join(".index"), &device_arg(&a.device)?)?;
    let q = match (&text, &a.image) {
        (Some(t), _) => searcher.embed_text(t)?,
        (None, Some(p)) => searcher.embed_image(p)?,
        (None, None) => unreachable!("clap requires one"),
    };
    let mut t = Table {
        headers: ["rank", "id", "title", "class", "split", "distance"].iter().map(|s| s.to_string()).collect(),
        rows: vec![],
    };
    for (i, h) in searcher.search(&q, a.modality, a.k as usize).into_iter().enumerate() {
        t.rows.push(vec![
            Cell::Int(i as i64 + 1),
            Cell::Text(h.id),
            Cell::Text(h.title),
            Cell::Text(h.class),
            Cell::Text(format!("{:?}", h.split).to_lowercase()),
            Cell::Num(Some(f64::from(h.distance))),
        ]);
    }
    print!("{}", t.render(a.format));
    Ok(0)
}
