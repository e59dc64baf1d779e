//! The cache keys of the shipped experiments must not change by accident: a changed key
//! silently recomputes (and orphans) every cached output of every user. The keys are
//! computed with a fixed `HUSE_ASSETS`, a stand-in file identity and a stand-in content
//! hash for each upstream output (so they do not depend on this machine's files), and
//! compared with `tests/fixtures/cache-keys.json`.
//!
//! A deliberate change (a stage's version bump, a new key part) regenerates the file with
//! `HUSE_UPDATE_KEYS=1 cargo test -p huse-run --test cache_keys` and says so in its commit.
//! History: written by the code before the crate split (1e055bd) and unchanged by it;
//! regenerated once when inputs entered keys by content instead of by upstream key (the
//! keys of stages without inputs stayed the same); evaluate 1 -> 2 (instance retrieval) changed
//! the keys of the evaluate stages only, and so did evaluate 2 -> 3 (the gallery attachment) and
//! 3 -> 4 (the validation split's figures).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn experiments_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments")
}

fn keys_of(file: &str) -> Vec<(String, String, String)> {
    let path = experiments_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let registry = huse_run::builtin_registry();
    let env = |k: &str| (k == "HUSE_ASSETS").then(|| "/assets".to_string());
    let exp =
        huse_config::compile_str(&text, file, &Default::default(), &registry, &env).unwrap_or_else(|d| panic!("{d}"));
    let identity = |p: &Path| Ok(format!("stand-in identity of {}", p.display()));
    let output_hash = |key: &str, artifact: &str| format!("stand-in hash of {artifact} in {key}");
    huse_exec::cache_keys(&exp, &registry, &identity, &output_hash).unwrap()
}

#[test]
fn cache_keys_of_the_shipped_experiments_are_unchanged() {
    let mut all: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for file in ["base.yaml", "quick.yaml", "toy.yaml", "ablation.yaml"] {
        for (run, stage, key) in keys_of(file) {
            all.entry(format!("{file} {run}")).or_default().insert(stage, key);
        }
    }
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cache-keys.json");
    let text = serde_json::to_string_pretty(&all).unwrap() + "\n";
    if std::env::var_os("HUSE_UPDATE_KEYS").is_some() {
        std::fs::write(&fixture, &text).unwrap();
        return;
    }
    let want: BTreeMap<String, BTreeMap<String, String>> =
        serde_json::from_slice(&std::fs::read(&fixture).expect("tests/fixtures/cache-keys.json")).unwrap();
    for (run, stages) in &want {
        let got = all.get(run).unwrap_or_else(|| panic!("run `{run}` is gone"));
        for (stage, key) in stages {
            assert_eq!(got.get(stage), Some(key), "{run}: the cache key of stage `{stage}` changed");
        }
    }
    assert_eq!(all.len(), want.len(), "the set of runs changed");
}
