//! What the train and evaluate stages share at their edges: the device of a stage
//! context and the dataset among a stage's inputs.

use candle_core::Device;
use huse_data::ClassTree;
use huse_stage_api::{DeviceSpec, Inputs, StageError};

use crate::data::Dataset;

fn aerr(e: anyhow::Error) -> StageError {
    StageError::msg(format!("{e:#}"))
}

/// The candle device for a stage's `device` (see `huse_models::device_of`).
pub fn device_of(spec: DeviceSpec) -> Result<Device, StageError> {
    huse_models::device_of(spec).map_err(aerr)
}

/// Reads the dataset artifacts (items, classes, encode features) among a stage's inputs.
pub fn load_dataset(inputs: &Inputs, use_tfidf: bool) -> Result<(Dataset, ClassTree), StageError> {
    let tree = ClassTree::read(inputs.get(huse_data::CLASSES)?).map_err(aerr)?;
    let tfidf = match (use_tfidf, inputs.optional("tfidf.safetensors"), inputs.optional("tfidf.json")) {
        (false, _, _) => None,
        (true, Some(a), Some(b)) => Some((a, b)),
        (true, _, _) => return Err(StageError::msg("use_tfidf is on, but no upstream stage gives tfidf.safetensors and tfidf.json")),
    };
    let ds = Dataset::load(inputs.get(huse_data::ITEMS)?, inputs.get("image.safetensors")?, inputs.get("text.safetensors")?, tfidf, tree.classes.len())
        .map_err(aerr)?;
    Ok((ds, tree))
}
