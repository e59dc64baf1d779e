//! Frozen pretrained encoders for HUSE, on candle.
//!
//! * [`torch_pth`]: PyTorch checkpoints in both the zip and the legacy format, hash-prefix
//!   checks and `$TORCH_HOME` resolution;
//! * [`mobilenet_v2`]: torchvision's MobileNetV2 (BatchNorm folded), 1280-d pooled features;
//! * [`image_prep`]: decode + PIL-exact bilinear resize + ImageNet normalisation;
//! * [`bert`] and [`text`]: a BERT encoder with every hidden state, the HUSE last-4-layer
//!   text feature, sentence embeddings and TF-IDF-aware truncation;
//! * [`tfidf`]: word TF-IDF features fitted on the training split.

pub mod bert;
pub mod image_prep;
pub mod mobilenet_v2;
pub mod model_ref;
pub mod text;
pub mod tfidf;
pub mod torch_pth;
