//! `huse-run embed RUN`: a trained run's image and text embeddings of its items (or of a
//! new table), as safetensors + ids.json.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use huse_exec::progress::Display;
use huse_stage_api::Progress as _;

use super::{Global, device_arg, open_for_queries, run_files, run_id};

/// `embed`'s arguments.
#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// The run (its id in the database).
    #[arg(value_parser = run_id)]
    pub run: i64,
    /// Which items: all, train, val or test.
    #[arg(long, default_value = "all")]
    pub split: String,
    /// Output folder (default: embed-RUN).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Embed a new table instead: a folder in the run's ingest layout (its table and
    /// image names as the run's ingest stage read them), every usable row.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Where the encoders and towers run: auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Writes the embeddings and says where.
pub async fn run(g: &Global, a: EmbedArgs, display: &Display) -> Result<i32> {
    let keep: Option<huse_data::Split> = match a.split.as_str() {
        "all" => None,
        other => match other.parse() {
            Ok(s) => Some(s),
            Err(_) => {
                eprintln!("error: --split {other}: expected all, train, val or test");
                return Ok(2);
            }
        },
    };
    let store = open_for_queries(g).await?;
    let files = run_files(&store, a.run).await?;
    store.close().await;
    let searcher = huse_search::Searcher::open(&files, &g.cache.join(".index"), &device_arg(&a.device)?)?;
    let out = a.out.unwrap_or_else(|| PathBuf::from(format!("embed-{}", a.run)));
    let n = match a.data {
        None => huse_search::write_embeddings(&searcher, keep, &out)?,
        Some(dir) => {
            let items = huse_search::read_new_table(&files, &dir)?;
            let bar = display.stage("embed");
            bar.start("texts", Some(items.len() as u64), "items");
            let texts: Vec<&str> = items.iter().map(|i| i.text.as_str()).collect();
            let text = searcher.embed_texts(&texts, 64, &mut |n| bar.inc(n as u64))?;
            bar.start("images", Some(items.len() as u64), "img");
            let paths: Vec<&std::path::Path> = items.iter().map(|i| std::path::Path::new(&i.image)).collect();
            let image = searcher.embed_images(&paths, 32, &mut |n| bar.inc(n as u64))?;
            bar.finish();
            let ids: Vec<String> = items.iter().map(|i| i.id.clone()).collect();
            huse_search::write_embedding_files(image, text, &ids, searcher.dim(), &out)?
        }
    };
    println!(
        "{} ({n} items: embeddings.safetensors with `image` and `text` ({n} x {}), ids.json)",
        out.display(),
        searcher.dim()
    );
    Ok(0)
}
