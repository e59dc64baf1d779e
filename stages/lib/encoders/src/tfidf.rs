//! Word TF-IDF features, fitted on the training split only.
//!
//! Formula (as scikit-learn's `TfidfVectorizer(smooth_idf=True, norm="l2")`):
//! * tokens: lower-cased runs of letters and digits;
//! * vocabulary: terms with document frequency >= `min_df` in the fitted documents, the
//!   `max_features` most frequent (ties by term), sorted by term;
//! * idf(t) = ln((1 + n) / (1 + df(t))) + 1, with n the number of fitted documents;
//! * row = (raw count of t in the text) x idf(t) over the vocabulary, then L2-normalised
//!   (an all-zero row stays zero).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// A fitted TF-IDF vocabulary.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Tfidf {
    /// The kept terms; a term's index is its column.
    pub terms: Vec<String>,
    /// Each term's inverse document frequency.
    pub idf: Vec<f32>,
    #[serde(skip)]
    index: HashMap<String, usize>,
}

/// Lower-cased alphanumeric tokens.
pub fn tokens(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric()).filter(|t| !t.is_empty()).map(str::to_lowercase)
}

impl Tfidf {
    /// Fits on `docs` (the training texts).
    pub fn fit<'a>(docs: impl IntoIterator<Item = &'a str>, max_features: usize, min_df: usize) -> Self {
        let mut df: BTreeMap<String, usize> = BTreeMap::new();
        let mut n = 0usize;
        for d in docs {
            n += 1;
            let mut seen: Vec<String> = tokens(d).collect();
            seen.sort();
            seen.dedup();
            for t in seen {
                *df.entry(t).or_default() += 1;
            }
        }
        let mut by_df: Vec<(String, usize)> = df.into_iter().filter(|(_, d)| *d >= min_df.max(1)).collect();
        by_df.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        by_df.truncate(max_features);
        by_df.sort_by(|a, b| a.0.cmp(&b.0));
        let idf = by_df.iter().map(|(_, d)| ((1.0 + n as f64) / (1.0 + *d as f64)).ln() as f32 + 1.0).collect();
        let terms: Vec<String> = by_df.into_iter().map(|(t, _)| t).collect();
        Tfidf::new(terms, idf)
    }

    /// A vocabulary from its parts (e.g. read back from disk).
    pub fn new(terms: Vec<String>, idf: Vec<f32>) -> Self {
        let index = terms.iter().enumerate().map(|(i, t)| (t.clone(), i)).collect();
        Tfidf { terms, idf, index }
    }

    /// Vocabulary size.
    pub fn len(&self) -> usize {
        self.terms.len()
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// The L2-normalised TF-IDF row of `text`.
    pub fn transform(&self, text: &str) -> Vec<f32> {
        let mut row = vec![0f32; self.terms.len()];
        for t in tokens(text) {
            if let Some(&i) = self.index.get(&t) {
                row[i] += self.idf[i];
            }
        }
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|v| *v /= norm);
        }
        row
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_tfidf() {
        let docs = ["Red Shirt", "blue shirt", "red red shoe"];
        let v = Tfidf::fit(docs, 100, 1);
        assert_eq!(v.terms, ["blue", "red", "shirt", "shoe"]);
        // n = 3; df: blue 1, red 2, shirt 2, shoe 1.
        let hi = (4f32 / 2.0).ln() + 1.0; // df 1
        let lo = (4f32 / 3.0).ln() + 1.0; // df 2
        assert!((v.idf[0] - hi).abs() < 1e-6 && (v.idf[1] - lo).abs() < 1e-6);
        // "red red shoe": red 2*lo, shoe hi, normalised.
        let row = v.transform("red red shoe");
        let n = ((2.0 * lo).powi(2) + hi * hi).sqrt();
        assert!((row[1] - 2.0 * lo / n).abs() < 1e-6 && (row[3] - hi / n).abs() < 1e-6);
        assert_eq!(row[0], 0.0);
        // Unknown words give a zero row; max_features keeps the most frequent.
        assert!(v.transform("green").iter().all(|x| *x == 0.0));
        assert_eq!(Tfidf::fit(docs, 2, 1).terms, ["red", "shirt"]);
        assert_eq!(Tfidf::fit(docs, 100, 2).terms, ["red", "shirt"]);
    }
}
