//! The frozen text encoder: a BERT-family model with its tokenizer.
//!
//! * [`TextEncoder::last4_mean`]: HUSE's text feature — for each of the last four hidden
//!   layers, the attention-masked mean over tokens; the four concatenated (4 x hidden).
//! * [`TextEncoder::sentence`]: the sentence-transformers embedding — masked mean of the
//!   last layer, L2-normalised (used for class names by the graph stage).
//! * Texts longer than `max_len` tokens keep their most important tokens by TF-IDF
//!   ([`TokenIdf`], fitted on the training texts), in their original order, instead of a
//!   blind cut; without an idf table they keep the first tokens.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::bert::{Bert, Config, l2_normalise, masked_mean};

/// Inverse document frequencies of token ids, for choosing which tokens of a long text to keep.
#[derive(Debug, Clone, Default)]
pub struct TokenIdf {
    idf: HashMap<u32, f32>,
    unseen: f32,
}

impl TokenIdf {
    /// Fits on tokenised documents: idf(t) = ln((1 + n) / (1 + df(t))) + 1.
    pub fn fit(docs: &[Vec<u32>]) -> Self {
        let mut df: HashMap<u32, usize> = HashMap::new();
        for d in docs {
            let mut seen: Vec<u32> = d.clone();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                *df.entry(t).or_default() += 1;
            }
        }
        let n = docs.len() as f32;
        let idf = df.into_iter().map(|(t, d)| (t, ((1.0 + n) / (1.0 + d as f32)).ln() + 1.0)).collect();
        TokenIdf { idf, unseen: (1.0 + n).ln() + 1.0 }
    }

    fn get(&self, t: u32) -> f32 {
        *self.idf.get(&t).unwrap_or(&self.unseen)
    }
}

/// Keeps `keep` tokens of `ids` (without special tokens): the highest tf x idf, ties to the
/// earlier position, in their original order.
pub fn keep_important(ids: &[u32], keep: usize, idf: &TokenIdf) -> Vec<u32> {
    if ids.len() <= keep {
        return ids.to_vec();
    }
    let mut tf: HashMap<u32, f32> = HashMap::new();
    for t in ids {
        *tf.entry(*t).or_default() += 1.0;
    }
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by(|&a, &b| {
        let (sa, sb) = (tf[&ids[a]] * idf.get(ids[a]), tf[&ids[b]] * idf.get(ids[b]));
        sb.total_cmp(&sa).then(a.cmp(&b))
    });
    let mut chosen: Vec<usize> = order.into_iter().take(keep).collect();
    chosen.sort_unstable();
    chosen.into_iter().map(|i| ids[i]).collect()
}

/// Tokenizer + BERT.
pub struct TextEncoder {
    tokenizer: tokenizers::Tokenizer,
    bert: Bert,
    device: Device,
    /// Longest input in tokens, special tokens included.
    pub max_len: usize,
    cls: u32,
    sep: u32,
    pad: u32,
}

impl TextEncoder {
    /// Loads `tokenizer.json`, `config.json` and `model.safetensors` from a model directory.
    pub fn load(dir: &Path, device: &Device, max_len: Option<usize>) -> Result<Self> {
        let need = |f: &str| -> Result<std::path::PathBuf> {
            let p = dir.join(f);
            anyhow::ensure!(p.is_file(), "model directory {} has no {f}", dir.display());
            Ok(p)
        };
        let mut tokenizer = tokenizers::Tokenizer::from_file(need("tokenizer.json")?)
            .map_err(|e| anyhow!("reading {}: {e}", dir.join("tokenizer.json").display()))?;
        tokenizer.with_truncation(None).map_err(|e| anyhow!("{e}"))?;
        tokenizer.with_padding(None);
        let config: Config = serde_json::from_slice(&std::fs::read(need("config.json")?)?)
            .with_context(|| format!("parsing {}", dir.join("config.json").display()))?;
        // SAFETY: the weights file is not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[need("model.safetensors")?], DType::F32, device)? };
        let bert = Bert::load(vb, &config)?;
        let id = |t: &str| tokenizer.token_to_id(t).ok_or_else(|| anyhow!("tokenizer has no {t} token"));
        let (cls, sep, pad) = (id("[CLS]")?, id("[SEP]")?, id("[PAD]").unwrap_or(0));
        let limit = config.max_position_embeddings;
        Ok(TextEncoder {
            tokenizer,
            bert,
            device: device.clone(),
            max_len: max_len.unwrap_or(limit).min(limit),
            cls,
            sep,
            pad,
        })
    }

    /// The hidden size of the model.
    pub fn hidden_size(&self) -> usize {
        self.bert.config.hidden_size
    }

    /// Token ids of each text without special tokens.
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let enc = self.tokenizer.encode_batch(texts.to_vec(), false).map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(enc.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// `[CLS] tokens [SEP]`, shortened to `max_len` (by TF-IDF when `idf` is given), padded to
    /// the longest: (ids, mask), both (B, L) u32.
    pub fn batch_ids(&self, texts: &[&str], idf: Option<&TokenIdf>) -> Result<(Tensor, Tensor)> {
        let keep = self.max_len - 2;
        let rows: Vec<Vec<u32>> = self
            .tokenize(texts)?
            .into_iter()
            .map(|t| {
                let body = match idf {
                    Some(idf) => keep_important(&t, keep, idf),
                    None => t.into_iter().take(keep).collect(),
                };
                let mut r = vec![self.cls];
                r.extend(body);
                r.push(self.sep);
                r
            })
            .collect();
        let l = rows.iter().map(Vec::len).max().unwrap_or(2);
        let mut ids = Vec::with_capacity(rows.len() * l);
        let mut mask = Vec::with_capacity(rows.len() * l);
        for r in &rows {
            ids.extend(r.iter().copied().chain(std::iter::repeat(self.pad)).take(l));
            mask.extend((0..l).map(|i| u32::from(i < r.len())));
        }
        let b = rows.len();
        Ok((Tensor::from_vec(ids, (b, l), &self.device)?, Tensor::from_vec(mask, (b, l), &self.device)?))
    }

    /// HUSE text features from ids and mask: masked means of the last 4 layers, concatenated
    /// in layer order (layer N-3, N-2, N-1, N): (B, 4 x hidden).
    pub fn last4_mean_ids(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let hs = self.bert.hidden_states(ids, mask)?;
        let n = hs.len();
        anyhow::ensure!(n >= 5, "the model has fewer than 4 layers");
        let means = hs[n - 4..].iter().map(|h| masked_mean(h, mask)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&means, 1)?)
    }

    /// The BERT model.
    pub fn bert(&self) -> &Bert {
        &self.bert
    }

    /// HUSE text features of `texts`.
    pub fn last4_mean(&self, texts: &[&str], idf: Option<&TokenIdf>) -> Result<Tensor> {
        let (ids, mask) = self.batch_ids(texts, idf)?;
        self.last4_mean_ids(&ids, &mask)
    }

    /// HUSE text features of many texts, as row-major rows in input order: the texts are
    /// batched by token length (`batch` at a time) so little padding is computed.
    ///
    /// On the CPU, as many batches as the pool has threads run at once (each batch's own ops
    /// still split over idle threads): part of a BERT forward — attention's many small
    /// per-head products, the strided copies between heads, layer norms, the pooling — runs
    /// on one thread, and another batch fills the other threads meanwhile. Each batch's
    /// features do not depend on what runs beside it.
    pub fn last4_mean_rows(
        &self,
        texts: &[&str],
        idf: Option<&TokenIdf>,
        batch: usize,
        mut done: impl FnMut(usize),
    ) -> Result<Vec<f32>> {
        use rayon::prelude::*;
        let dim = 4 * self.hidden_size();
        let lens: Vec<usize> = self.tokenize(texts)?.iter().map(Vec::len).collect();
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| (lens[i], i));
        let mut rows = vec![0f32; texts.len() * dim];
        let features = |chunk: &[usize]| -> Result<Vec<f32>> {
            let b: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
            Ok(self.last4_mean(&b, idf)?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?)
        };
        let chunks: Vec<&[usize]> = order.chunks(batch.max(1)).collect();
        let at_once = if self.device.is_cpu() { rayon::current_num_threads().max(1) } else { 1 };
        for group in chunks.chunks(at_once) {
            let feats: Vec<Vec<f32>> = group.par_iter().map(|c| features(c)).collect::<Result<_>>()?;
            for (chunk, f) in group.iter().zip(&feats) {
                for (r, &i) in chunk.iter().enumerate() {
                    rows[i * dim..(i + 1) * dim].copy_from_slice(&f[r * dim..(r + 1) * dim]);
                }
                done(chunk.len());
            }
        }
        Ok(rows)
    }

    /// Sentence embeddings: masked mean of the last layer, L2-normalised: (B, hidden).
    pub fn sentence(&self, texts: &[&str]) -> Result<Tensor> {
        let (ids, mask) = self.batch_ids(texts, None)?;
        let hs = self.bert.hidden_states(&ids, &mask)?;
        l2_normalise(&masked_mean(hs.last().unwrap(), &mask)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_rarest_tokens_in_order() {
        // Token 1 is in every document (idf 1), 7 and 9 in one of 8 (idf ln(9/2)+1 = 2.5).
        let docs: Vec<Vec<u32>> = [2, 3, 4, 5, 6, 8, 7, 9].iter().map(|t| vec![1, *t]).collect();
        let idf = TokenIdf::fit(&docs);
        // tf x idf: 1 -> 2 x 1 = 2, 9 and 7 -> 2.5: the rare ones stay, in order.
        assert_eq!(keep_important(&[1, 9, 1, 7], 2, &idf), vec![9, 7]);
        // tf counts: a common token repeated often can outrank a rare one.
        let idf = TokenIdf::fit(&[vec![1], vec![1, 5]]);
        assert_eq!(keep_important(&[5, 1, 1, 1, 1], 1, &idf), vec![1]);
        assert_eq!(keep_important(&[4, 5], 3, &idf), vec![4, 5]);
    }
}
