//! The encode stage on the fixture items: its stored features equal PyTorch's.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use huse_stage_api::{Inputs, testing};
use serde_json::json;

fn var(n: &str) -> PathBuf {
    PathBuf::from(std::env::var(n).unwrap_or_else(|_| panic!("set {n}")))
}

#[test]
fn encode_writes_features_equal_to_the_pytorch_fixtures() {
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(var("HUSE_REFERENCE").join("fixtures/encoders.json")).unwrap()).unwrap();
    let fx = candle_core::safetensors::load(var("HUSE_REFERENCE").join("fixtures/encoders.safetensors"), &Device::Cpu).unwrap();
    let data = var("HUSE_ASSETS").join("data/fashion-product-images-small");
    // items.jsonl of the six fixture items (+ their texts), 4 train, 1 val, 1 test.
    let dir = tempfile::tempdir().unwrap();
    let ingest = dir.path().join("ingest");
    std::fs::create_dir_all(&ingest).unwrap();
    let splits = ["train", "train", "train", "train", "val", "test"];
    let lines: Vec<String> = meta["ids"]
        .as_array()
        .unwrap()
        .iter()
        .zip(meta["texts"].as_array().unwrap())
        .zip(splits)
        .map(|((id, text), split)| {
            json!({"id": id.to_string(), "image": data.join(format!("images/{id}.jpg")), "text": text, "class": 0, "split": split}).to_string()
        })
        .collect();
    std::fs::write(ingest.join("items.jsonl"), lines.join("\n")).unwrap();
    let mut inputs = Inputs::default();
    inputs.insert("items.jsonl", "ingest", ingest.join("items.jsonl"));
    let out = dir.path().join("encode");
    // SAFETY: set before any thread of this test binary reads it.
    unsafe { std::env::set_var("TORCH_HOME", var("HUSE_ASSETS").join("torch")) };
    let cfg = json!({"text_model": var("HUSE_ASSETS").join("models/all-MiniLM-L6-v2"), "batch_size": 4, "text_batch_size": 4, "tfidf": {"min_df": 1}});
    let m = testing::run(&huse_stage_encode::Encode, &cfg, &inputs, &out, 0).unwrap();
    assert!(m.last("encode.images_per_s").unwrap() > 0.0);

    let img = candle_core::safetensors::load(out.join("image.safetensors"), &Device::Cpu).unwrap();
    let f = &img["features"];
    assert_eq!(f.dims(), &[6, 1280]);
    let cos = |a: &Tensor, b: &Tensor| -> Vec<f32> {
        let (a, b): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (a.to_vec2().unwrap(), b.to_vec2().unwrap());
        a.iter().zip(&b).map(|(x, y)| {
            let d: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
            d / (x.iter().map(|v| v * v).sum::<f32>().sqrt() * y.iter().map(|v| v * v).sum::<f32>().sqrt())
        }).collect()
    };
    let c = cos(f, &fx["image_pooled"]);
    assert!(c.iter().all(|v| *v >= 0.999), "{c:?}");
    let txt = candle_core::safetensors::load(out.join("text.safetensors"), &Device::Cpu).unwrap();
    let e = (&txt["bert"] - &fx["text_last4_mean"]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(e < 1e-4, "{e}");
    let ids: Vec<String> = serde_json::from_slice(&std::fs::read(out.join("ids.json")).unwrap()).unwrap();
    assert_eq!(ids[0], "27562");
    // TF-IDF: fitted on the 4 training texts only; every row is unit length or empty.
    let tf = candle_core::safetensors::load(out.join("tfidf.safetensors"), &Device::Cpu).unwrap();
    let indptr: Vec<i64> = tf["indptr"].to_vec1().unwrap();
    let values: Vec<f32> = tf["values"].to_vec1().unwrap();
    assert_eq!(indptr.len(), 7);
    for r in 0..6 {
        let row = &values[indptr[r] as usize..indptr[r + 1] as usize];
        let n: f32 = row.iter().map(|v| v * v).sum();
        assert!(row.is_empty() || (n - 1.0).abs() < 1e-5);
    }
    let vocab: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("tfidf.json")).unwrap()).unwrap();
    let terms: Vec<&str> = vocab["terms"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert!(terms.contains(&"scullers") && !terms.contains(&"rockport"), "val/test words must not leak: {terms:?}");
}
