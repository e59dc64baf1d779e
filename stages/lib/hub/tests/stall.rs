//! A Hub that accepts connections and never answers: every request gives up after its
//! timeout (with retries), and at once when the caller cancels. (One test: it sets
//! process-wide environment variables.)

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use huse_hub::{Failure, HubRef, Kind};

#[test]
fn a_stalled_hub_times_out_retries_and_honours_cancellation() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Accept and hold every connection, answering nothing.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s);
        }
    });
    let home = tempfile::tempdir().unwrap();
    // SAFETY: this test binary has this one test; nothing else reads the environment meanwhile.
    unsafe {
        std::env::set_var("HF_ENDPOINT", format!("http://{addr}"));
        std::env::set_var("HF_HOME", home.path());
        std::env::remove_var("HF_HUB_OFFLINE");
    }
    let r = HubRef::parse("hf:someone/data").unwrap().unwrap();

    // Listing: 2 tries of 1 s without an answer, 1 s apart.
    let t0 = Instant::now();
    let err = r.info(Kind::Dataset, Duration::from_secs(1), 1, &|| false).unwrap_err();
    let took = t0.elapsed();
    match &err {
        Failure::Failed(why) => assert!(
            why.contains("no answer from the hub for 1 s, 2 time(s)") && why.contains("HUSE_HUB_TIMEOUT"),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(10), "{took:?}");

    // A download: the same, and no file appears in the cache.
    let err = r.fetch(Kind::Dataset, "data/train.parquet", Duration::from_millis(500), 0, &|| false).unwrap_err();
    assert!(matches!(&err, Failure::Failed(w) if w.contains("no answer")), "{err:?}");
    assert!(r.cached_file(Kind::Dataset, "data/train.parquet").is_none());

    // Cancelled (Ctrl-C, SIGTERM) while waiting: gives up within a fraction of a second,
    // however long the timeout.
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        s2.store(true, Ordering::SeqCst);
    });
    let t0 = Instant::now();
    let err = r
        .fetch(Kind::Model, "model.safetensors", Duration::from_secs(120), 3, &|| stop.load(Ordering::SeqCst))
        .unwrap_err();
    assert_eq!(err, Failure::Cancelled);
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());

    // The environment's default timeout.
    unsafe { std::env::set_var("HUSE_HUB_TIMEOUT", "2.5") };
    assert_eq!(huse_hub::timeout_from_env(), Duration::from_millis(2500));
    unsafe { std::env::set_var("HUSE_HUB_TIMEOUT", "soon") };
    assert_eq!(huse_hub::timeout_from_env(), huse_hub::DEFAULT_TIMEOUT);
}
