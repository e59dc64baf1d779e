//! `huse-run`: the declarative experiment runner for HUSE.
//!
//! An experiment file (YAML) names a DAG of stages; [`config`] compiles it (overrides,
//! sweeps, validation with positioned errors), [`exec`] schedules its stages with a
//! content-addressed [`cache`], [`store`] records runs, params, stage runs and metrics in
//! SQLite, and [`query`] reads them back. The runner knows nothing of HUSE itself: stages
//! are crates behind the `huse-stage-api` trait, listed in [`registry`].

pub mod cache;
pub mod cli;
pub mod config;
pub mod exec;
pub mod plugin;
pub mod progress;
pub mod query;
pub mod registry;
pub mod report;
pub mod store;
pub mod yaml;
