//! `hf:` model references against a local HTTP server standing in for the Hugging Face hub.
//! (One test: it sets process-wide environment variables.)

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use huse_encoders::model_ref::ModelRef;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// The stand-in hub, answering as commit `COMMIT`.
fn serve(files: Vec<(String, Vec<u8>)>) -> (String, Arc<AtomicUsize>) {
    huse_hub::testing::serve(files, COMMIT)
}

#[test]
fn hub_references_download_into_the_cache_then_work_offline() {
    let model = PathBuf::from(std::env::var("HUSE_ASSETS").unwrap()).join("models/all-MiniLM-L6-v2");
    let names = ["config.json", "tokenizer.json"];
    let files: Vec<(String, Vec<u8>)> = names
        .iter()
        .map(|f| {
            (format!("/sentence-transformers/all-MiniLM-L6-v2/resolve/main/{f}"), std::fs::read(model.join(f)).unwrap())
        })
        .collect();
    let (endpoint, hits) = serve(files.clone());
    let home = tempfile::tempdir().unwrap();
    // SAFETY: single-threaded at this point of the only test in this binary.
    unsafe {
        std::env::set_var("HF_HOME", home.path());
        std::env::set_var("HF_ENDPOINT", &endpoint);
        std::env::remove_var("HF_HUB_OFFLINE");
    }
    let r: ModelRef = "hf:sentence-transformers/all-MiniLM-L6-v2".parse().unwrap();
    let dir = r.resolve(&names).unwrap();
    for (f, (_, body)) in names.iter().zip(&files) {
        assert_eq!(&std::fs::read(dir.join(f)).unwrap(), body, "{f}");
    }
    assert!(dir.ends_with(format!("snapshots/{COMMIT}")), "{}", dir.display());
    let refs = home.path().join("hub/models--sentence-transformers--all-MiniLM-L6-v2/refs/main");
    assert_eq!(std::fs::read_to_string(&refs).unwrap().trim(), COMMIT);
    assert_eq!(r.local_paths(), vec![refs]);
    let served = hits.load(Ordering::SeqCst);
    assert!(served >= 2, "{served} requests");

    // Now offline: the cache serves it without any request.
    unsafe { std::env::set_var("HF_HUB_OFFLINE", "1") };
    assert_eq!(r.resolve(&names).unwrap(), dir);
    assert_eq!(hits.load(Ordering::SeqCst), served);
    // Offline and missing: the error names the file and how to provide it.
    let err = r.resolve(&["model.safetensors"]).unwrap_err().to_string();
    assert!(
        err.contains(
            "model.safetensors of hf:sentence-transformers/all-MiniLM-L6-v2@main is not in the Hugging Face cache"
        ),
        "{err}"
    );
    assert!(err.contains("HF_HUB_OFFLINE") && err.contains("huggingface-cli download"), "{err}");
    // Online but the server lacks it: the error says the download failed, and where from.
    unsafe { std::env::remove_var("HF_HUB_OFFLINE") };
    let err = r.resolve(&["model.safetensors"]).unwrap_err().to_string();
    assert!(err.contains("downloading") && err.contains(&endpoint) && err.contains("model.safetensors"), "{err}");
    // torchvision-style checkpoints download from their URL into $TORCH_HOME/hub/checkpoints,
    // checked against the hash prefix in the name first.
    let ckpt = std::fs::read(
        PathBuf::from(std::env::var("HUSE_ASSETS").unwrap()).join("torch/hub/checkpoints/mobilenet_v2-b0353104.pth"),
    )
    .unwrap();
    let mut bad = ckpt.clone();
    bad[1000] ^= 1;
    let (torch_url, torch_hits) = serve(vec![
        ("/models/mobilenet_v2-b0353104.pth".into(), ckpt.clone()),
        ("/models/broken-b0353104.pth".into(), bad),
    ]);
    let torch_home = tempfile::tempdir().unwrap();
    unsafe {
        std::env::set_var("TORCH_HOME", torch_home.path());
        std::env::remove_var("HUSE_OFFLINE");
    }
    let url = format!("{torch_url}/models/mobilenet_v2-b0353104.pth");
    let p = huse_encoders::torch_pth::resolve(None, &url).unwrap();
    assert_eq!(p, torch_home.path().join("hub/checkpoints/mobilenet_v2-b0353104.pth"));
    assert_eq!(std::fs::read(&p).unwrap(), ckpt);
    assert_eq!(huse_encoders::torch_pth::load(&p).unwrap().len(), 314);
    let n = torch_hits.load(Ordering::SeqCst);
    assert_eq!(huse_encoders::torch_pth::resolve(None, &url).unwrap(), p, "the second time it is found locally");
    assert_eq!(torch_hits.load(Ordering::SeqCst), n);
    let err = huse_encoders::torch_pth::resolve(None, &format!("{torch_url}/models/broken-b0353104.pth"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not start with `b0353104`") && err.contains("downloading"), "{err}");
    assert!(
        std::fs::read_dir(torch_home.path().join("hub/checkpoints")).unwrap().count() == 1,
        "no partial or bad file is left"
    );
    unsafe { std::env::set_var("HUSE_OFFLINE", "1") };
    let err = huse_encoders::torch_pth::resolve(None, &format!("{torch_url}/models/other-12345678.pth"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("HUSE_OFFLINE is set") && err.contains("other-12345678.pth"), "{err}");

    // A local directory without the files says which one is missing.
    let err = ModelRef::Local(home.path().to_path_buf()).resolve(&names).unwrap_err().to_string();
    assert!(err.contains("has no config.json"), "{err}");
}
