//! `huse-run`: the declarative experiment runner for HUSE — the thin binary over the
//! runner's libraries.
//!
//! An experiment file (YAML) names a DAG of stages; `huse-config` compiles it (overrides,
//! sweeps, validation with positioned errors) against the stage kinds of a
//! `huse-registry`; `huse-exec` schedules its stages with a content-addressed cache;
//! `huse-store` records runs, params, stage runs and metrics and answers queries;
//! `huse-report` renders tables, the HTML report and exports. This crate parses the
//! command line ([`cli`]), runs each command from its own module ([`cmd`]) and registers
//! the built-in stages ([`builtin_registry`]). The
//! runner knows nothing of HUSE itself: stages are crates behind the `huse-stage-api`
//! trait.

use std::sync::Arc;

use huse_registry::Registry;

pub mod cli;
pub mod cmd;
pub mod project;

/// The registry with every built-in stage kind: the five HUSE stages, `graph-tree`, and the
/// toy stages that exercise the runner without a model.
pub fn builtin_registry() -> Registry {
    let mut r = Registry::default();
    for s in huse_stage_toy::stages() {
        r.add(Arc::from(s), "builtin");
    }
    r.add(Arc::new(huse_stage_ingest::Ingest), "builtin");
    r.add(Arc::new(huse_stage_graph::SentenceGraph), "builtin");
    r.add(Arc::new(huse_stage_graph::TreeGraph), "builtin");
    r.add(Arc::new(huse_stage_encode::Encode), "builtin");
    r.add(Arc::new(huse_stage_train::Train), "builtin");
    r.add(Arc::new(huse_stage_evaluate::Evaluate), "builtin");
    r.add(Arc::new(huse_stage_command::Command), "builtin");
    r
}
