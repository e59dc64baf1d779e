//! `root: hf:ORG/NAME[@REVISION]`: a dataset on the Hugging Face Hub, read from its Parquet
//! files.
//!
//! The files of the `hub.split` (and `hub.config`, when the dataset has several) are found
//! in the repository's file list — `data/train-00000-of-00001.parquet`,
//! `default/train/0000.parquet`, `train.parquet` — and fetched with hf-hub (repository type
//! dataset) into the same Hugging Face cache, under the same rules as models: `HF_HOME`,
//! `HF_ENDPOINT`, and `HF_HUB_OFFLINE` (then the cached snapshot is listed instead).
//!
//! The rows are then written once, per commit, as an ordinary table the rest of ingest
//! reads: `<download dir>/hf/datasets--ORG--NAME/<commit>/<config>/<split>/table.csv`, every
//! column as text (lists of strings as JSON lists, so a wrapped class path works as in a
//! CSV), and every image column — `Image()` features stored as `{bytes, path}` structs, or
//! plain binary columns — as files `images/<blake3>.<ext>` whose relative path is the
//! column's value. So `image: "{image}"` names them.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;
use huse_hub::{HubRef, Kind};
use huse_stage_api::{Context, StageError};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Deserialize;

/// The `hub:` block of the ingest config (used with an `hf:` root).
#[derive(Debug, Clone, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HubCfg {
    /// The dataset split to read.
    #[serde(default = "d_split")]
    pub split: String,
    /// The dataset configuration (subset), when it has several.
    #[serde(default)]
    pub config: Option<String>,
    /// Seconds a Hub request may go without an answer or a byte before it is abandoned and
    /// tried again (default: `HUSE_HUB_TIMEOUT`, else 30).
    #[serde(default)]
    pub timeout_s: Option<f64>,
    /// Tries after the first when a request stalls.
    #[serde(default = "d_retries")]
    pub retries: u32,
}

fn d_split() -> String {
    "train".into()
}

fn d_retries() -> u32 {
    huse_hub::DEFAULT_RETRIES
}

impl Default for HubCfg {
    fn default() -> Self {
        HubCfg { split: d_split(), config: None, timeout_s: None, retries: d_retries() }
    }
}

impl HubCfg {
    /// The request timeout.
    pub fn timeout(&self) -> std::time::Duration {
        self.timeout_s.map(std::time::Duration::from_secs_f64).unwrap_or_else(huse_hub::timeout_from_env)
    }

    /// Checks the values; an error names the key under `hub.`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if let Some(t) = self.timeout_s
            && !(t.is_finite() && t > 0.0 && t <= 86_400.0)
        {
            return Err(("timeout_s", format!("expected more than 0 and at most 86400 seconds, found {t}")));
        }
        if self.retries > 10 {
            return Err(("retries", format!("expected at most 10, found {}", self.retries)));
        }
        Ok(())
    }
}

/// `Some(reference)` when `root` is an `hf:` reference (an error when malformed).
pub fn parse(root: &Path) -> Option<Result<HubRef, String>> {
    HubRef::parse(root.to_str()?)
}

/// The file whose identity says which commit the reference's revision is (for cache keys).
pub fn refs_path(r: &HubRef) -> Option<PathBuf> {
    r.refs_path(Kind::Dataset)
}

/// The Parquet files of `split` (and `config`) among a repository's files.
pub fn select(files: &[String], hub: &HubCfg) -> Vec<String> {
    let split = hub.split.as_str();
    let mut out: Vec<String> = files
        .iter()
        .filter(|f| f.ends_with(".parquet"))
        .filter(|f| hub.config.as_deref().is_none_or(|c| f.split('/').next() == Some(c)))
        .filter(|f| {
            let parts: Vec<&str> = f.split('/').collect();
            let (name, dirs) = parts.split_last().expect("non-empty");
            dirs.contains(&split) || name.starts_with(&format!("{split}-")) || *name == format!("{split}.parquet")
        })
        .cloned()
        .collect();
    out.sort();
    out
}

fn list_snapshot(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(dir) {
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out
}

/// The commit and local paths of the Parquet files of `hub.split` of the dataset,
/// downloaded into the hub cache when missing.
pub fn parquet_files(
    r: &HubRef,
    hub: &HubCfg,
    stop: &dyn Fn() -> bool,
) -> Result<(String, Vec<PathBuf>), huse_hub::Failure> {
    use huse_hub::Failure;
    let (repo, revision) = (r.repo.as_str(), r.revision.as_str());
    let how = format!(
        "fetch it where the hub is reachable (`huggingface-cli download {repo} --repo-type dataset --revision {revision}` with HF_HOME pointing at the same cache), or point `root` at a local copy"
    );
    let what = format!("dataset hf:{repo}@{revision}");
    let cached_snapshot = || r.snapshot(Kind::Dataset).filter(|(_, snap)| snap.is_dir());
    let pick = |files: &[String]| -> Result<Vec<String>, String> {
        let chosen = select(files, hub);
        if chosen.is_empty() {
            let parquet: Vec<&String> = files.iter().filter(|f| f.ends_with(".parquet")).collect();
            return Err(format!(
                "{what} has no Parquet file for split `{}`{} (its Parquet files: {})",
                hub.split,
                hub.config.as_ref().map(|c| format!(" of config `{c}`")).unwrap_or_default(),
                if parquet.is_empty() {
                    "none".to_string()
                } else {
                    parquet.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                }
            ));
        }
        Ok(chosen)
    };
    if huse_hub::offline() {
        let (commit, snap) = cached_snapshot().ok_or_else(|| {
            Failure::Failed(format!("{what} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: {how}"))
        })?;
        let files = pick(&list_snapshot(&snap)).map_err(Failure::Failed)?;
        return Ok((commit, files.iter().map(|f| snap.join(f)).collect()));
    }
    let (sha, names) = match r.info(Kind::Dataset, hub.timeout(), hub.retries, stop) {
        Ok(i) => i,
        Err(Failure::Cancelled) => return Err(Failure::Cancelled),
        Err(Failure::Failed(e)) => {
            // Unreachable hub: a cached snapshot still works.
            return match cached_snapshot() {
                Some((commit, snap)) => {
                    let files = pick(&list_snapshot(&snap)).map_err(Failure::Failed)?;
                    Ok((commit, files.iter().map(|f| snap.join(f)).collect()))
                }
                None => Err(Failure::Failed(format!(
                    "{what}: listing its files failed ({e}) and it is not in the Hugging Face cache: {how}"
                ))),
            };
        }
    };
    let mut paths = Vec::new();
    for f in pick(&names).map_err(Failure::Failed)? {
        paths.push(r.fetch(Kind::Dataset, &f, hub.timeout(), hub.retries, stop).map_err(|e| match e {
            Failure::Cancelled => Failure::Cancelled,
            Failure::Failed(e) => Failure::Failed(format!("{what}: {e}: {how}")),
        })?);
    }
    Ok((sha, paths))
}

fn write_blob(images: &Path, bytes: &[u8]) -> Result<String, String> {
    let name = crate::download::blob_name(bytes).unwrap_or_else(|| format!("{}.bin", blake3::hash(bytes).to_hex()));
    let path = images.join(&name);
    if !path.is_file() {
        std::fs::write(&path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(format!("images/{name}"))
}

/// One cell as text; image bytes become a file in `images`.
fn cell(a: &ArrayRef, row: usize, images: &Path, column: &str) -> Result<String, String> {
    if a.is_null(row) {
        return Ok(String::new());
    }
    Ok(match a.data_type() {
        DataType::Utf8 => a.as_string::<i32>().value(row).to_string(),
        DataType::LargeUtf8 => a.as_string::<i64>().value(row).to_string(),
        DataType::Utf8View => a.as_string_view().value(row).to_string(),
        DataType::Boolean => a.as_boolean().value(row).to_string(),
        DataType::Int8 => a.as_primitive::<Int8Type>().value(row).to_string(),
        DataType::Int16 => a.as_primitive::<Int16Type>().value(row).to_string(),
        DataType::Int32 => a.as_primitive::<Int32Type>().value(row).to_string(),
        DataType::Int64 => a.as_primitive::<Int64Type>().value(row).to_string(),
        DataType::UInt8 => a.as_primitive::<UInt8Type>().value(row).to_string(),
        DataType::UInt16 => a.as_primitive::<UInt16Type>().value(row).to_string(),
        DataType::UInt32 => a.as_primitive::<UInt32Type>().value(row).to_string(),
        DataType::UInt64 => a.as_primitive::<UInt64Type>().value(row).to_string(),
        DataType::Float32 => a.as_primitive::<Float32Type>().value(row).to_string(),
        DataType::Float64 => a.as_primitive::<Float64Type>().value(row).to_string(),
        DataType::Binary => write_blob(images, a.as_binary::<i32>().value(row))?,
        DataType::LargeBinary => write_blob(images, a.as_binary::<i64>().value(row))?,
        DataType::BinaryView => write_blob(images, a.as_binary_view().value(row))?,
        // The `datasets` Image() feature: {bytes, path}; the bytes when present, else the path.
        DataType::Struct(fields) if fields.iter().any(|f| f.name() == "bytes") => {
            let s = a.as_struct();
            let bytes = s.column_by_name("bytes").expect("checked");
            if !bytes.is_null(row) {
                cell(bytes, row, images, column)?
            } else if let Some(p) = s.column_by_name("path") {
                cell(p, row, images, column)?
            } else {
                String::new()
            }
        }
        DataType::List(_) | DataType::LargeList(_) => {
            let values = match a.data_type() {
                DataType::List(_) => a.as_list::<i32>().value(row),
                _ => a.as_list::<i64>().value(row),
            };
            let items: Vec<String> =
                (0..values.len()).map(|i| cell(&values, i, images, column)).collect::<Result<_, _>>()?;
            serde_json::to_string(&items).expect("strings serialise")
        }
        other => {
            return Err(format!(
                "column `{column}` has type {other}, which ingest cannot read (text, numbers, booleans, images and lists are supported)"
            ));
        }
    })
}

/// Writes the rows of `files` as `dest/table.csv` (+ `dest/images/`), through a temporary
/// folder renamed at the end; `dest` that exists is complete and reused.
pub fn materialize(files: &[PathBuf], dest: &Path, ctx: &Context) -> Result<(), String> {
    if dest.join("table.csv").is_file() {
        return Ok(());
    }
    let parent = dest.parent().expect("a folder under the download dir");
    std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let tmp =
        parent.join(format!(".tmp-{}-{}", dest.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let images = tmp.join("images");
    std::fs::create_dir_all(&images).map_err(|e| format!("creating {}: {e}", images.display()))?;
    let result = (|| -> Result<(), String> {
        let mut w = csv::Writer::from_path(tmp.join("table.csv")).map_err(|e| format!("writing table: {e}"))?;
        let mut header: Option<Vec<String>> = None;
        // Each file's footer is read once: for the row count of the progress bar, then to read it.
        let builders = files
            .iter()
            .map(|f| {
                let open = File::open(f).map_err(|e| format!("opening {}: {e}", f.display()))?;
                ParquetRecordBatchReaderBuilder::try_new(open)
                    .map(|b| (f, b))
                    .map_err(|e| format!("{}: not a readable Parquet file ({e})", f.display()))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let total: i64 = builders.iter().map(|(_, b)| b.metadata().file_metadata().num_rows()).sum();
        ctx.progress.start("read parquet", Some(total.max(0) as u64), "rows");
        for (f, builder) in builders {
            let names: Vec<String> = builder.schema().fields().iter().map(|x| x.name().clone()).collect();
            match &header {
                None => {
                    w.write_record(&names).map_err(|e| e.to_string())?;
                    header = Some(names.clone());
                }
                Some(h) if *h != names => {
                    return Err(format!("{}: columns {names:?} differ from the first file's {h:?}", f.display()));
                }
                Some(_) => {}
            }
            let reader = builder.with_batch_size(1024).build().map_err(|e| format!("{}: {e}", f.display()))?;
            for batch in reader {
                ctx.cancel.check().map_err(|e| e.to_string())?;
                let batch = batch.map_err(|e| format!("{}: {e}", f.display()))?;
                for row in 0..batch.num_rows() {
                    let rec: Vec<String> = batch
                        .columns()
                        .iter()
                        .zip(&names)
                        .map(|(c, n)| cell(c, row, &images, n))
                        .collect::<Result<_, _>>()?;
                    w.write_record(&rec).map_err(|e| e.to_string())?;
                }
                ctx.progress.inc(batch.num_rows() as u64);
            }
        }
        w.flush().map_err(|e| e.to_string())?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    match std::fs::rename(&tmp, dest) {
        Ok(()) => Ok(()),
        // Another process finished the same table first.
        Err(_) if dest.join("table.csv").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => Err(format!("moving {} to {}: {e}", tmp.display(), dest.display())),
    }
}

/// For an `hf:` root: the folder holding the dataset's split as `table.csv` + `images/`.
pub fn prepare(r: &HubRef, hub: &HubCfg, download_dir: &Path, ctx: &Context) -> Result<PathBuf, StageError> {
    let (commit, files) = parquet_files(r, hub, &|| ctx.cancel.is_cancelled()).map_err(|e| match e {
        huse_hub::Failure::Cancelled => StageError::Cancelled,
        huse_hub::Failure::Failed(why) => StageError::msg(why),
    })?;
    let dest = download_dir
        .join("hf")
        .join(format!("datasets--{}", r.repo.replace('/', "--")))
        .join(&commit)
        .join(hub.config.as_deref().unwrap_or("default"))
        .join(&hub.split);
    materialize(&files, &dest, ctx).map_err(StageError::msg)?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_and_file_selection() {
        let r = parse(Path::new("hf:ashraq/fashion-product-images-small")).unwrap().unwrap();
        assert_eq!((r.repo.as_str(), r.revision.as_str()), ("ashraq/fashion-product-images-small", "main"));
        assert!(parse(Path::new("/data/x")).is_none());
        assert!(parse(Path::new("hf:a/b@")).unwrap().is_err());
        let files: Vec<String> = [
            "README.md",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "data/test-00000-of-00001.parquet",
            "small/train/0000.parquet",
            "train.parquet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let train = HubCfg::default();
        assert_eq!(
            select(&files, &train),
            [
                "data/train-00000-of-00002.parquet",
                "data/train-00001-of-00002.parquet",
                "small/train/0000.parquet",
                "train.parquet"
            ]
        );
        assert_eq!(
            select(&files, &HubCfg { split: "test".into(), config: None, ..HubCfg::default() }),
            ["data/test-00000-of-00001.parquet"]
        );
        assert_eq!(
            select(&files, &HubCfg { split: "train".into(), config: Some("small".into()), ..HubCfg::default() }),
            ["small/train/0000.parquet"]
        );
        assert!(select(&files, &HubCfg { split: "validation".into(), config: None, ..HubCfg::default() }).is_empty());
    }
}
