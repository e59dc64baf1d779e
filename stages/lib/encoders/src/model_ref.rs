//! Model references in experiment files: a local directory, or `hf:org/name[@revision]`.
//!
//! A hub reference is looked up in the Hugging Face cache (`$HF_HOME/hub`, default
//! `~/.cache/huggingface/hub`, the layout `huggingface_hub` uses), and downloaded into it
//! with hf-hub when a file is missing, unless `HF_HUB_OFFLINE` is set. `HF_ENDPOINT`
//! chooses the server. When a file can be neither found nor downloaded, the error says
//! which file and how to provide it.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Result, anyhow, bail};
use huse_hub::{HubRef, Kind};

/// The files a BERT-family text model directory must hold.
pub const TEXT_MODEL_FILES: &[&str] = &["config.json", "tokenizer.json", "model.safetensors"];

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// A directory on disk.
    Local(PathBuf),
    /// A Hugging Face hub repository at a revision (branch, tag or commit).
    Hub {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit.
        revision: String,
    },
}

impl FromStr for ModelRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty model reference".into());
        }
        match HubRef::parse(s) {
            None => Ok(ModelRef::Local(PathBuf::from(s))),
            Some(r) => r.map(|h| ModelRef::Hub { repo: h.repo, revision: h.revision }),
        }
    }
}

fn hub_ref(repo: &str, revision: &str) -> HubRef {
    HubRef { repo: repo.to_string(), revision: revision.to_string() }
}

impl ModelRef {
    /// Paths whose identity should enter a cache key (the directory, or the hub ref file).
    pub fn local_paths(&self) -> Vec<PathBuf> {
        match self {
            ModelRef::Local(p) => vec![p.clone()],
            ModelRef::Hub { repo, revision } => hub_ref(repo, revision).refs_path(Kind::Model).into_iter().collect(),
        }
    }

    /// A directory holding every file of `files`: found locally or in the hub cache, or downloaded.
    pub fn resolve(&self, files: &[&str]) -> Result<PathBuf> {
        match self {
            ModelRef::Local(dir) => {
                if !dir.is_dir() {
                    bail!("model directory {} does not exist", dir.display());
                }
                for f in files {
                    if !dir.join(f).is_file() {
                        bail!("model directory {} has no {f} (a text model needs {})", dir.display(), files.join(", "));
                    }
                }
                Ok(dir.clone())
            }
            ModelRef::Hub { repo, revision } => {
                let mut dir: Option<PathBuf> = None;
                for f in files {
                    let cached =
                        hub_ref(repo, revision).snapshot(Kind::Model).map(|(_, s)| s.join(f)).filter(|p| p.is_file());
                    let path = match cached {
                        Some(p) => p,
                        None => download(repo, revision, f)?,
                    };
                    let parent = path.parent().map(Path::to_path_buf);
                    match &dir {
                        None => dir = parent,
                        Some(d) if Some(d) != parent.as_ref() => {
                            bail!(
                                "files of hf:{repo}@{revision} resolved to different snapshots ({} and {})",
                                d.display(),
                                path.display()
                            )
                        }
                        _ => {}
                    }
                }
                dir.ok_or_else(|| anyhow!("no files requested"))
            }
        }
    }
}

fn download(repo: &str, revision: &str, file: &str) -> Result<PathBuf> {
    let cache = huse_hub::cache_dir().map(|d| d.display().to_string()).unwrap_or_else(|| "(no HF_HOME or HOME)".into());
    let how = format!(
        "provide it by running `huggingface-cli download {repo} --revision {revision}` where the hub is reachable \
         (with HF_HOME pointing at the same cache), or set the model to a local directory holding the files"
    );
    if huse_hub::offline() {
        bail!(
            "{file} of hf:{repo}@{revision} is not in the Hugging Face cache at {cache} and HF_HUB_OFFLINE is set: {how}"
        );
    }
    // Without a stage's cancel token here: a stalled download gives up after the timeout.
    hub_ref(repo, revision)
        .fetch(Kind::Model, file, huse_hub::timeout_from_env(), huse_hub::DEFAULT_RETRIES, &|| false)
        .map_err(|e| {
            anyhow!("{file} of hf:{repo}@{revision} is not in the Hugging Face cache at {cache} and {e}: {how}")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        assert_eq!("models/x".parse::<ModelRef>().unwrap(), ModelRef::Local("models/x".into()));
        assert_eq!(
            "hf:sentence-transformers/all-MiniLM-L6-v2".parse::<ModelRef>().unwrap(),
            ModelRef::Hub { repo: "sentence-transformers/all-MiniLM-L6-v2".into(), revision: "main".into() }
        );
        assert_eq!(
            "hf:a/b@v1.0".parse::<ModelRef>().unwrap(),
            ModelRef::Hub { repo: "a/b".into(), revision: "v1.0".into() }
        );
        for bad in ["hf:", "hf:/x", "hf:a/b/c", "hf:a/b@", "hf:a b/c", ""] {
            assert!(bad.parse::<ModelRef>().is_err(), "{bad}");
        }
    }
}
