//! The encode stage on the fixture items: its stored features equal PyTorch's.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use huse_stage_api::{Inputs, testing};
use serde_json::json;

fn var(n: &str) -> PathBuf {
    PathBuf::from(std::env::var(n).unwrap_or_else(|_| panic!("set {n}")))
}

/// Writes the `items.jsonl` of the six fixture items (4 train, 1 val, 1 test) under `dir`.
fn fixture_items(dir: &std::path::Path) -> Inputs {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(var("HUSE_REFERENCE").join("fixtures/encoders.json")).unwrap()).unwrap();
    let data = var("HUSE_ASSETS").join("data/fashion-product-images-small");
    let ingest = dir.join("ingest");
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
    inputs
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn augmented_views_are_encoded_for_training_items_only_and_leave_the_clean_features_alone() {
    use huse_encoders::augment::{Jitter, view_of, view_rng};
    use huse_encoders::image_prep;
    let dir = tempfile::tempdir().unwrap();
    let inputs = fixture_items(dir.path());
    // SAFETY: set before any thread of this test binary reads it.
    unsafe { std::env::set_var("TORCH_HOME", var("HUSE_ASSETS").join("torch")) };
    let run = |name: &str, views: serde_json::Value| {
        let cfg = json!({"text_model": var("HUSE_ASSETS").join("models/all-MiniLM-L6-v2"), "batch_size": 3, "text_batch_size": 4, "tfidf": null, "views": views});
        let out = dir.path().join(name);
        let m = testing::run(&huse_stage_encode::Encode, &cfg, &inputs, &out, 0).unwrap();
        (candle_core::safetensors::load(out.join("image.safetensors"), &Device::Cpu).unwrap(), m)
    };
    let (plain, _) = run("plain", serde_json::Value::Null);
    assert!(!plain.contains_key("views"), "no views unless asked for");
    let jitter =
        json!({"count": 2, "seed": 7, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "hflip": 0.5});
    let (aug, m) = run("aug", jitter.clone());
    // The clean features are the same, bit for bit, with or without views.
    assert_eq!(max_abs_diff(&aug["features"], &plain["features"]), 0.0);
    // 4 training items x 2 views; val and test items get none.
    let views = &aug["views"];
    assert_eq!(views.dims(), &[8, 1280]);
    assert_eq!(m.last("encode.views"), Some(8.0));
    assert!(m.last("encode.all_images_per_s").unwrap() > 0.0);
    // Row t*K + k is view k of training item t: recompute two of them one by one.
    let items = huse_data::read_items(inputs.get("items.jsonl").unwrap()).unwrap();
    let model = huse_stage_encode::image_model(&Default::default()).unwrap();
    let j = Jitter { brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.1, hflip: 0.5 };
    for (t, k) in [(1usize, 0usize), (3, 1)] {
        let it = &items[t];
        let resized = image_prep::load_resized(std::path::Path::new(&it.image), 224).unwrap();
        let x = image_prep::batch(&[view_of(&resized, 224, &j.sample(&mut view_rng(7, &it.id, k)))], 224, &Device::Cpu)
            .unwrap();
        let want = model.forward_cpu(&x).unwrap().pooled;
        let got = views.narrow(0, t * 2 + k, 1).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-4, "view {k} of training item {t}");
        // An augmented view differs from the clean image's features.
        assert!(max_abs_diff(&got, &aug["features"].narrow(0, t, 1).unwrap()) > 1e-2);
    }
    // Same settings, same views; another seed, other views.
    let (again, _) = run("again", jitter.clone());
    assert_eq!(max_abs_diff(&again["views"], views), 0.0);
    let mut other = jitter.clone();
    other["seed"] = json!(8);
    let (other, _) = run("other", other);
    assert!(max_abs_diff(&other["views"], views) > 1e-2);
    // A view with no jitter and no flip is the clean image.
    let (identity, _) = run("identity", json!({"count": 1}));
    let clean_train = plain["features"].narrow(0, 0, 4).unwrap();
    assert!(max_abs_diff(&identity["views"], &clean_train) < 1e-5);
}

#[test]
fn bad_view_settings_are_refused_by_key() {
    use huse_stage_api::Stage;
    let cfg =
        |views: serde_json::Value| json!({"text_model": "hf:sentence-transformers/all-MiniLM-L6-v2", "views": views});
    let err = |views| {
        let e = huse_stage_encode::Encode.validate(&cfg(views)).unwrap_err();
        format!("{} {}", e.path.join("."), e.message)
    };
    assert!(err(json!({"count": 0})).starts_with("views.count must be 1 to 64"));
    assert!(err(json!({"count": 2, "hue": 0.7})).starts_with("views.hue"));
    assert!(err(json!({"count": 2, "contrast": -0.1})).starts_with("views.contrast"));
    assert!(err(json!({"count": 2, "hflip": 2})).starts_with("views.hflip"));
    assert!(err(json!({"count": 2, "blur": 1})).contains("blur"));
    assert!(huse_stage_encode::Encode.validate(&cfg(json!({"count": 2, "hue": 0.1, "hflip": 0.5}))).is_ok());
}

#[test]
fn encode_writes_features_equal_to_the_pytorch_fixtures() {
    let fx = candle_core::safetensors::load(var("HUSE_REFERENCE").join("fixtures/encoders.safetensors"), &Device::Cpu)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let inputs = fixture_items(dir.path());
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
        a.iter()
            .zip(&b)
            .map(|(x, y)| {
                let d: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
                d / (x.iter().map(|v| v * v).sum::<f32>().sqrt() * y.iter().map(|v| v * v).sum::<f32>().sqrt())
            })
            .collect()
    };
    let c = cos(f, &fx["image_pooled"]);
    assert!(c.iter().all(|v| *v >= 0.999), "{c:?}");
    let txt = candle_core::safetensors::load(out.join("text.safetensors"), &Device::Cpu).unwrap();
    let e = (&txt["bert"] - &fx["text_last4_mean"])
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
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
