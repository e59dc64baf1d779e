//! `huse-hub`: references to Hugging Face Hub repositories — `hf:ORG/NAME[@REVISION]` in
//! experiment files — for models (the encoders' `model:` keys) and datasets (ingest's
//! `root:`), and where their files are in the local Hugging Face cache.
//!
//! The cache is the one `huggingface_hub` uses (`$HF_HOME/hub`, default
//! `~/.cache/huggingface/hub`; `models--ORG--NAME/` or `datasets--ORG--NAME/` with
//! `refs/<revision>` and `snapshots/<commit>/`); downloads go through hf-hub into it, from
//! `HF_ENDPOINT` when set; `HF_HUB_OFFLINE` forbids them.

use std::path::PathBuf;

pub mod testing;

/// The kind of repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A model repository.
    Model,
    /// A dataset repository.
    Dataset,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Model => "models",
            Kind::Dataset => "datasets",
        }
    }
}

/// `hf:REPO@REVISION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    /// `ORG/NAME` (or a bare `NAME`).
    pub repo: String,
    /// Branch, tag or commit (`main` when not given).
    pub revision: String,
}

impl HubRef {
    /// `None` when `s` is no `hf:` reference; an error when it is one but malformed.
    pub fn parse(s: &str) -> Option<Result<HubRef, String>> {
        let s = s.trim();
        let rest = s.strip_prefix("hf:")?;
        let (repo, revision) = rest.split_once('@').unwrap_or((rest, "main"));
        let ok = |x: &str| !x.is_empty() && x.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)) && !x.contains("..");
        if !ok(repo) || repo.starts_with('/') || repo.ends_with('/') || repo.matches('/').count() > 1 {
            return Some(Err(format!("`{s}`: expected hf:ORG/NAME[@REVISION]")));
        }
        if !ok(revision) {
            return Some(Err(format!("`{s}`: bad revision `{revision}`")));
        }
        Some(Ok(HubRef { repo: repo.to_string(), revision: revision.to_string() }))
    }

    /// The repository's folder in the cache.
    pub fn repo_dir(&self, kind: Kind) -> Option<PathBuf> {
        cache_dir().map(|c| c.join(format!("{}--{}", kind.prefix(), self.repo.replace('/', "--"))))
    }

    /// The file that says which commit the revision is (its identity belongs in cache keys).
    pub fn refs_path(&self, kind: Kind) -> Option<PathBuf> {
        self.repo_dir(kind).map(|d| d.join("refs").join(&self.revision))
    }

    /// The commit and snapshot folder of the revision, when the cache knows it.
    pub fn snapshot(&self, kind: Kind) -> Option<(String, PathBuf)> {
        let dir = self.repo_dir(kind)?;
        // A 40-hex revision is a commit; otherwise refs/<revision> holds the commit.
        let commit = if self.revision.len() == 40 && self.revision.chars().all(|c| c.is_ascii_hexdigit()) {
            self.revision.clone()
        } else {
            std::fs::read_to_string(dir.join("refs").join(&self.revision)).ok()?.trim().to_string()
        };
        Some((commit.clone(), dir.join("snapshots").join(commit)))
    }

    /// An hf-hub handle on the repository (downloads into the same cache).
    pub fn api(&self, kind: Kind) -> Result<hf_hub::api::sync::ApiRepo, String> {
        let mut builder = hf_hub::api::sync::ApiBuilder::from_env().with_progress(false);
        if let Some(dir) = cache_dir() {
            builder = builder.with_cache_dir(dir);
        }
        let api = builder.build().map_err(|e| format!("cannot set up the hub client: {e}"))?;
        let kind = match kind {
            Kind::Model => hf_hub::RepoType::Model,
            Kind::Dataset => hf_hub::RepoType::Dataset,
        };
        Ok(api.repo(hf_hub::Repo::with_revision(self.repo.clone(), kind, self.revision.clone())))
    }
}

impl std::fmt::Display for HubRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "hf:{}@{}", self.repo, self.revision)
    }
}

/// The hub cache: `$HF_HOME/hub`, or `~/.cache/huggingface/hub`.
pub fn cache_dir() -> Option<PathBuf> {
    std::env::var_os("HF_HOME")
        .map(|h| PathBuf::from(h).join("hub"))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub")))
}

/// Whether `HF_HUB_OFFLINE` forbids downloads.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        assert!(HubRef::parse("models/x").is_none());
        let r = HubRef::parse("hf:sentence-transformers/all-MiniLM-L6-v2").unwrap().unwrap();
        assert_eq!((r.repo.as_str(), r.revision.as_str()), ("sentence-transformers/all-MiniLM-L6-v2", "main"));
        assert_eq!(HubRef::parse("hf:a/b@v1.0").unwrap().unwrap().revision, "v1.0");
        assert_eq!(HubRef::parse("hf:gpt2").unwrap().unwrap().repo, "gpt2", "a repository without an organisation");
        for bad in ["hf:", "hf:/x", "hf:a/b/c", "hf:a/b@", "hf:a b/c", "hf:a/../b"] {
            assert!(HubRef::parse(bad).unwrap().is_err(), "{bad}");
        }
        assert_eq!(r.to_string(), "hf:sentence-transformers/all-MiniLM-L6-v2@main");
    }
}
