//! `huse-run export`: runs, params and metrics in long form, as CSV or JSON.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use clap::Args;

use super::{Global, open_for_queries};

/// `export`'s arguments.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Only runs of this experiment.
    #[arg(long, short = 'e')]
    pub experiment: Option<String>,
    /// csv or json.
    #[arg(long, short = 'f', default_value = "csv")]
    pub format: String,
    /// Output file (default: standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Writes the export. Everything is checked before the output file is touched; it is then
/// written to a temporary file beside it and renamed, so an existing file is never left
/// half-written.
pub async fn run(g: &Global, a: ExportArgs) -> Result<i32> {
    if !["csv", "json"].contains(&a.format.as_str()) {
        eprintln!("error: unknown export format `{}` (csv or json)", a.format);
        return Ok(2);
    }
    let store = open_for_queries(g).await?;
    let Some(p) = a.out else {
        huse_report::export(&store, a.experiment.as_deref(), &a.format, &mut std::io::stdout()).await?;
        return Ok(0);
    };
    let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "export".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = async {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
        );
        huse_report::export(&store, a.experiment.as_deref(), &a.format, &mut f).await?;
        std::io::Write::flush(&mut f)?;
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))
    }
    .await;
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    println!("{}", p.display());
    Ok(0)
}
