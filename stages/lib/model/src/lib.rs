//! `huse-model`: HUSE itself — the model ([`model`]: the image and text towers and the
//! shared classifier), the three losses ([`loss`]: `class_loss`, `graph_loss`,
//! `gap_loss`), the fused CPU kernels behind them ([`fused`]), the optimisers ([`optim`]:
//! RMSProp, AdamW, schedules), the feature dataset ([`data`]) and the paper's metrics
//! ([`metrics`]: Recall@K, HP@K, accuracy).
//!
//! Plain library code: it takes a candle `Device`, paths and slices, and knows nothing of
//! stages; the train and evaluate stages are thin layers over it.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod dropout;
pub mod fused;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod names;
pub mod optim;
