//! HUSE itself: the model ([`model`]), the three losses ([`loss`]: `class_loss`,
//! `graph_loss`, `gap_loss`), the optimisers ([`optim`]: RMSProp, AdamW, schedules), the
//! feature dataset ([`data`]) and the paper's metrics ([`metrics`]: Recall@K, HP@K,
//! accuracy). The train and evaluate stages are thin layers over this crate.

pub mod data;
pub mod fused;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod stage_io;
