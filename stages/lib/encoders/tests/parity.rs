//! Parity of our encoders with PyTorch on real items: the fixtures in
//! `$HUSE_REFERENCE/fixtures/` were computed with torch 2.9.1, torchvision 0.24.1 and
//! sentence-transformers (see `encoders.json` there).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use huse_encoders::{image_prep, mobilenet_v2::MobileNetV2, text::TextEncoder, torch_pth};

fn var(name: &str) -> PathBuf {
    PathBuf::from(std::env::var(name).unwrap_or_else(|_| panic!("set {name} (see README: Assets)")))
}

fn fixtures() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(var("HUSE_REFERENCE").join("fixtures/encoders.safetensors"), &Device::Cpu).unwrap()
}

fn meta() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(var("HUSE_REFERENCE").join("fixtures/encoders.json")).unwrap()).unwrap()
}

fn checkpoint() -> PathBuf {
    var("HUSE_ASSETS").join("torch/hub/checkpoints/mobilenet_v2-b0353104.pth")
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn scale(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn cosines(a: &Tensor, b: &Tensor) -> Vec<f32> {
    let a: Vec<Vec<f32>> = a.to_vec2().unwrap();
    let b: Vec<Vec<f32>> = b.to_vec2().unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            let d: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
            d / (x.iter().map(|v| v * v).sum::<f32>().sqrt() * y.iter().map(|v| v * v).sum::<f32>().sqrt())
        })
        .collect()
}

fn argmax_rows(t: &Tensor) -> Vec<u32> {
    t.argmax(1).unwrap().to_vec1().unwrap()
}

#[test]
fn legacy_checkpoint_loads_with_torchvision_names_and_hash() {
    let p = checkpoint();
    assert!(torch_pth::verify_hash_prefix(&p).unwrap());
    let w = torch_pth::load(&p).unwrap();
    assert_eq!(w.len(), 314);
    let params: usize =
        w.iter().filter(|(k, _)| !k.ends_with("num_batches_tracked")).map(|(_, t)| t.elem_count()).sum();
    assert!(params > 3_500_000 && params < 3_600_000, "{params} parameters");
    assert_eq!(w["features.0.0.weight"].dims(), &[32, 3, 3, 3]);
    assert_eq!(w["classifier.1.weight"].dims(), &[1000, 1280]);
    assert_eq!(w["features.18.1.running_var"].dims(), &[1280]);
}

#[test]
fn truncated_or_corrupt_checkpoints_give_clear_errors() {
    let bytes = std::fs::read(checkpoint()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated.pth", bytes[..bytes.len() - 1000].to_vec(), "truncated"),
        ("half.pth", bytes[..bytes.len() / 2].to_vec(), "truncated"),
        ("header-only.pth", bytes[..200].to_vec(), "corrupt"),
        ("garbage.pth", b"hello, not a checkpoint".to_vec(), "not a PyTorch checkpoint"),
        ("empty.pth", Vec::new(), "not a PyTorch checkpoint"),
    ];
    for (name, data, expected) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        let err = format!("{:#}", torch_pth::load(&p).unwrap_err());
        assert!(err.contains(expected) && err.contains(name), "{name}: {err}");
    }
    // A flipped byte keeps the format but breaks the hash the file name promises.
    let mut bad = bytes.clone();
    let n = bad.len() - 10;
    bad[n] ^= 0xff;
    let p = dir.path().join("mobilenet_v2-b0353104.pth");
    std::fs::write(&p, bad).unwrap();
    let err = torch_pth::verify_hash_prefix(&p).unwrap_err().to_string();
    assert!(err.contains("does not start with `b0353104`"), "{err}");
}

#[test]
fn checkpoint_resolves_through_torch_home() {
    // SAFETY: this test process sets the variable before any thread reads it.
    unsafe {
        std::env::set_var("TORCH_HOME", var("HUSE_ASSETS").join("torch"));
        std::env::set_var("HUSE_OFFLINE", "1");
    }
    let p = torch_pth::resolve(None, "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth").unwrap();
    assert_eq!(p, checkpoint());
    let err = torch_pth::resolve(None, "https://example.invalid/models/nope-12345678.pth").unwrap_err().to_string();
    assert!(err.contains("nope-12345678.pth not found"), "{err}");
}

#[test]
fn mobilenet_v2_matches_torchvision_on_the_fixture_inputs() {
    let f = fixtures();
    let model = MobileNetV2::load(&torch_pth::load(&checkpoint()).unwrap()).unwrap();
    let x = &f["image_input"];
    let (pooled_ref, logits_ref) = (&f["image_pooled"], &f["image_logits"]);
    let top1_ref = argmax_rows(logits_ref);
    // Both forward paths: the fast CPU one and the generic candle-ops one.
    for (name, out) in [("cpu", model.forward_cpu(x).unwrap()), ("candle", model.forward(x).unwrap())] {
        let ep = max_abs(&out.pooled, pooled_ref) / scale(pooled_ref);
        let el = max_abs(&out.logits, logits_ref) / scale(logits_ref);
        println!("{name}: pooled max abs err / scale = {ep:.2e}, logits = {el:.2e}");
        assert!(ep < 1e-4 && el < 1e-4, "{name}: pooled {ep:.2e}, logits {el:.2e}");
        assert_eq!(argmax_rows(&out.logits), top1_ref, "{name}: top-1");
    }
    assert_eq!(top1_ref, [841, 399, 610, 584, 774, 502]);
}

/// The CPU path keeps its activation buffers between batches: a batch gives the same bits
/// after batches of other sizes (smaller, larger, another resolution) as on a fresh model,
/// so no stale value of an earlier batch leaks into a later one.
#[test]
fn mobilenet_v2_cpu_buffers_carry_nothing_between_batches() {
    let f = fixtures();
    let weights = torch_pth::load(&checkpoint()).unwrap();
    let model = MobileNetV2::load(&weights).unwrap();
    let x = &f["image_input"]; // 6 x 3 x 224 x 224
    let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let first = bits(&model.forward_cpu(x).unwrap().pooled);
    // A smaller batch, a lower resolution (the input rows cropped), and a larger batch.
    let two = x.narrow(0, 1, 2).unwrap();
    let small = x.narrow(2, 16, 160).unwrap().narrow(3, 32, 160).unwrap().contiguous().unwrap();
    let big = Tensor::cat(&[x, x], 0).unwrap();
    let after: Vec<Vec<f32>> =
        [&two, &small, &big, x].iter().map(|t| bits(&model.forward_cpu(t).unwrap().pooled)).collect();
    let fresh = |t: &Tensor| bits(&MobileNetV2::load(&weights).unwrap().forward_cpu(t).unwrap().pooled);
    assert_eq!(after[0], fresh(&two), "2-image batch after a 6-image one");
    assert_eq!(after[1], fresh(&small), "160 px batch after 224 px ones");
    // Another batch size may block the GEMMs differently (rounding), so this one is close,
    // not equal: a stale value would be off by far more.
    for (half, part) in after[2].chunks(first.len()).enumerate() {
        let worst = part.iter().zip(&first).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4 * first.iter().fold(0f32, |m, v| m.max(v.abs())), "12-image batch, half {half}: {worst}");
    }
    assert_eq!(after[3], first, "the first batch again");
}

#[test]
fn jpeg_to_pooled_matches_torchvision_pipeline() {
    let f = fixtures();
    let ids: Vec<u64> = meta()["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let images: Vec<Vec<f32>> = ids
        .iter()
        .map(|id| {
            image_prep::preprocess_file(
                &var("HUSE_ASSETS").join(format!("data/fashion-product-images-small/images/{id}.jpg")),
                224,
            )
            .unwrap()
        })
        .collect();
    let x = image_prep::batch(&images, 224, &Device::Cpu).unwrap();
    let input_err = max_abs(&x, &f["image_input"]);
    println!("preprocessing max abs err vs torchvision input: {input_err:.4} (normalised units)");
    let model = MobileNetV2::load(&torch_pth::load(&checkpoint()).unwrap()).unwrap();
    let out = model.forward_cpu(&x).unwrap();
    let cos = cosines(&out.pooled, &f["image_pooled"]);
    println!("JPEG -> pooled cosine vs PyTorch: {cos:?}");
    assert!(cos.iter().all(|c| *c >= 0.999), "{cos:?}");
}

fn texts() -> Vec<String> {
    meta()["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect()
}

fn text_encoder() -> TextEncoder {
    TextEncoder::load(&var("HUSE_ASSETS").join("models/all-MiniLM-L6-v2"), &Device::Cpu, Some(256)).unwrap()
}

#[test]
fn tokenizer_matches_the_fixture_ids() {
    let f = fixtures();
    let enc = text_encoder();
    let t = texts();
    let refs: Vec<&str> = t.iter().map(String::as_str).collect();
    let (ids, mask) = enc.batch_ids(&refs, None).unwrap();
    let ids_ref: Vec<Vec<i64>> = f["text_input_ids"].to_vec2().unwrap();
    let mask_ref: Vec<Vec<i64>> = f["text_attention_mask"].to_vec2().unwrap();
    let ids: Vec<Vec<u32>> = ids.to_vec2().unwrap();
    let mask: Vec<Vec<u32>> = mask.to_vec2().unwrap();
    for i in 0..ids.len() {
        assert_eq!(ids[i].iter().map(|&v| i64::from(v)).collect::<Vec<_>>(), ids_ref[i], "row {i}");
        assert_eq!(mask[i].iter().map(|&v| i64::from(v)).collect::<Vec<_>>(), mask_ref[i], "row {i}");
    }
}

#[test]
fn the_fused_cpu_bert_equals_candle_ops_at_any_thread_count() {
    // The fused linear layers (bias, GELU, residual) and masked softmax against candle's ops,
    // on the real model and texts of different lengths (padding inside the batch).
    let enc = text_encoder();
    let t = texts();
    let refs: Vec<&str> = t.iter().map(String::as_str).collect();
    let (ids, mask) = enc.batch_ids(&refs, None).unwrap();
    let reference = enc.bert().hidden_states_ops(&ids, &mask).unwrap();
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let fused = pool.install(|| enc.bert().hidden_states(&ids, &mask).unwrap());
        assert_eq!(fused.len(), reference.len());
        for (i, (a, b)) in fused.iter().zip(&reference).enumerate() {
            let e = max_abs(a, b);
            assert!(e < 2e-5 * scale(b).max(1.0), "{threads} threads, hidden state {i}: {e:.2e}");
        }
    }
}

/// Many texts through `last4_mean_rows`: batches by token length, several batches at once on
/// a multi-thread pool — each row equals that text's batch run alone, in input order, and the
/// result is the same bits with one thread or three.
#[test]
fn text_rows_in_concurrent_batches_equal_one_batch_at_a_time() {
    let enc = text_encoder();
    let t = texts();
    // 3 x the fixture texts, batches of 4: several batches, a short last one.
    let refs: Vec<&str> = t.iter().chain(&t).chain(&t).map(String::as_str).collect();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut done = 0;
        let rows = pool.install(|| enc.last4_mean_rows(&refs, None, 4, |k| done += k).unwrap());
        assert_eq!(done, refs.len(), "progress counts every text once");
        rows
    };
    let (one, three) = (run(1), run(3));
    assert_eq!(one, three, "1 vs 3 threads");
    let alone = enc.last4_mean(&refs, None).unwrap();
    let dim = alone.dim(1).unwrap();
    let alone: Vec<f32> = alone.flatten_all().unwrap().to_vec1().unwrap();
    let worst = one.iter().zip(&alone).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4, "rows vs one padded batch: {worst:.2e} ({dim} features)");
}

#[test]
fn text_features_match_sentence_transformers() {
    let f = fixtures();
    let enc = text_encoder();
    let t = texts();
    let refs: Vec<&str> = t.iter().map(String::as_str).collect();
    let last4 = enc.last4_mean(&refs, None).unwrap();
    let e4 = max_abs(&last4, &f["text_last4_mean"]);
    let sent = enc.sentence(&refs).unwrap();
    let es = max_abs(&sent, &f["text_sentence"]);
    println!("text_last4_mean max abs err {e4:.2e}; text_sentence {es:.2e}");
    assert!(e4 < 1e-4, "last4 {e4:.2e}");
    assert!(es < 1e-4, "sentence {es:.2e}");
    // Padding must not change an item's features (masked mean).
    let alone = enc.last4_mean(&refs[3..4], None).unwrap();
    assert!(max_abs(&alone, &last4.narrow(0, 3, 1).unwrap()) < 1e-4);
}

#[test]
fn class_level_embeddings_match() {
    let f = fixtures();
    let enc = text_encoder();
    let levels: Vec<Vec<String>> = meta()["class_levels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .collect();
    let flat: Vec<&str> = levels.iter().flatten().map(String::as_str).collect();
    let emb = enc.sentence(&flat).unwrap().reshape((levels.len(), 3, 384)).unwrap();
    let e = max_abs(&emb, &f["class_level_sentence"]);
    println!("class_level_sentence max abs err {e:.2e}");
    assert!(e < 1e-4, "{e:.2e}");
}
