//! `root: hf:ORG/NAME` against a local HTTP server standing in for the Hugging Face Hub,
//! serving a Parquet file this test writes in the layout of
//! `ashraq/fashion-product-images-small` (real fashion images embedded as `Image()` structs).
//! (One test: it sets process-wide environment variables.)

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow_array::builder::{BinaryBuilder, StringBuilder};
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray, StructArray};
use arrow_schema::{DataType, Field, Fields};
use huse_stage_api::{Inputs, testing};
use huse_stage_ingest::Ingest;
use serde_json::json;

const COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";
const REPO: &str = "ashraq/fashion-product-images-small";
const FILE: &str = "data/train-00000-of-00001.parquet";

fn fashion() -> PathBuf {
    PathBuf::from(std::env::var("HUSE_ASSETS").expect("set HUSE_ASSETS")).join("data/fashion-product-images-small")
}

/// The stand-in hub serving the repository info and `FILE`.
fn serve(parquet: Vec<u8>) -> (String, Arc<AtomicUsize>) {
    let info = json!({"sha": COMMIT, "siblings": [{"rfilename": ".gitattributes"}, {"rfilename": "README.md"}, {"rfilename": FILE}]}).to_string().into_bytes();
    huse_hub::testing::serve(
        vec![
            (format!("/api/datasets/{REPO}/revision/main"), info),
            (format!("/datasets/{REPO}/resolve/main/{FILE}"), parquet),
        ],
        COMMIT,
    )
}

/// Six real items as the Hub dataset stores them (ids, class columns, name, Image()).
fn parquet_bytes() -> (Vec<u8>, Vec<(i64, Vec<u8>)>) {
    let rows: [(i64, &str, &str, &str, &str); 6] = [
        (15970, "Apparel", "Topwear", "Shirts", "Turtle Check Men Navy Blue Shirt"),
        (39386, "Apparel", "Bottomwear", "Jeans", "Peter England Men Party Blue Jeans"),
        (59263, "Accessories", "Watches", "Watches", "Titan Women Silver Watch"),
        (21379, "Apparel", "Bottomwear", "Track Pants", "Manchester United Men Solid Black Track Pants"),
        (53759, "Apparel", "Topwear", "Tshirts", "Puma Men Grey T-shirt"),
        (1855, "Apparel", "Topwear", "Tshirts", "Inkfruit Mens Chain Reaction T-shirt"),
    ];
    let images: Vec<(i64, Vec<u8>)> =
        rows.iter().map(|r| (r.0, std::fs::read(fashion().join(format!("images/{}.jpg", r.0))).unwrap())).collect();
    let mut bytes = BinaryBuilder::new();
    let mut paths = StringBuilder::new();
    for (_, b) in &images {
        bytes.append_value(b);
        paths.append_null();
    }
    let image_fields =
        Fields::from(vec![Field::new("bytes", DataType::Binary, true), Field::new("path", DataType::Utf8, true)]);
    let image = StructArray::new(
        image_fields,
        vec![Arc::new(bytes.finish()) as ArrayRef, Arc::new(paths.finish()) as ArrayRef],
        None,
    );
    let col = |i: usize| {
        Arc::new(StringArray::from(rows.iter().map(|r| [r.1, r.2, r.3, r.4][i]).collect::<Vec<_>>())) as ArrayRef
    };
    let batch = RecordBatch::try_from_iter(vec![
        ("id", Arc::new(Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())) as ArrayRef),
        ("masterCategory", col(0)),
        ("subCategory", col(1)),
        ("articleType", col(2)),
        ("productDisplayName", col(3)),
        ("image", Arc::new(image) as ArrayRef),
    ])
    .unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut out = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    (out, images)
}

#[test]
fn a_hub_dataset_is_read_from_its_parquet_files_then_works_offline() {
    let (parquet, images) = parquet_bytes();
    let (endpoint, hits) = serve(parquet);
    let home = tempfile::tempdir().unwrap();
    let downloads = tempfile::tempdir().unwrap();
    // SAFETY: the only test of this binary; no other thread reads the environment.
    unsafe {
        std::env::set_var("HF_HOME", home.path());
        std::env::set_var("HF_ENDPOINT", &endpoint);
        std::env::remove_var("HF_HUB_OFFLINE");
    }
    let cfg = json!({
        "root": format!("hf:{REPO}"), "image": "{image}", "text_column": "productDisplayName",
        "classes": ["masterCategory", "subCategory", "articleType"], "min_items_per_class": 1,
        "hub": {"split": "train"}, "download": {"dir": downloads.path()},
    });
    let out = tempfile::tempdir().unwrap();
    let m = testing::run(&Ingest, &cfg, &Inputs::default(), out.path(), 0).unwrap();
    let items = huse_data::read_items(&out.path().join("items.jsonl")).unwrap();
    assert_eq!(items.len(), 6);
    assert_eq!(m.last("data.rows"), Some(6.0));
    for (id, bytes) in &images {
        let it = items.iter().find(|i| i.id == id.to_string()).unwrap();
        assert_eq!(&std::fs::read(&it.image).unwrap(), bytes, "item {id}: the embedded image, byte for byte");
    }
    let shirt = items.iter().find(|i| i.id == "15970").unwrap();
    assert_eq!(shirt.text, "Turtle Check Men Navy Blue Shirt");
    let table = downloads
        .path()
        .join(format!("hf/datasets--ashraq--fashion-product-images-small/{COMMIT}/default/train/table.csv"));
    assert!(table.is_file(), "written once per commit, config and split");
    let refs = home.path().join("hub/datasets--ashraq--fashion-product-images-small/refs/main");
    assert_eq!(
        std::fs::read_to_string(&refs).unwrap().trim(),
        COMMIT,
        "the same Hugging Face cache layout as huggingface_hub"
    );
    assert_eq!(huse_stage_api::Stage::reads(&Ingest, &cfg), vec![refs], "the cache key follows the revision's commit");
    let served = hits.load(Ordering::SeqCst);

    // Offline, with the written table gone: the Parquet file comes from the hub cache, no request.
    std::fs::remove_dir_all(downloads.path().join("hf")).unwrap();
    unsafe { std::env::set_var("HF_HUB_OFFLINE", "1") };
    let out2 = tempfile::tempdir().unwrap();
    testing::run(&Ingest, &cfg, &Inputs::default(), out2.path(), 0).unwrap();
    assert_eq!(huse_data::read_items(&out2.path().join("items.jsonl")).unwrap(), items);
    assert_eq!(hits.load(Ordering::SeqCst), served);

    // A split the dataset lacks: the error lists the Parquet files it has.
    let mut val = cfg.clone();
    val["hub"]["split"] = json!("validation");
    let err = testing::run(&Ingest, &val, &Inputs::default(), tempfile::tempdir().unwrap().path(), 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no Parquet file for split `validation`") && err.contains(FILE), "{err}");
    // Offline and not cached: the error says how to get it.
    let mut other = cfg.clone();
    other["root"] = json!("hf:someone/else");
    let err = testing::run(&Ingest, &other, &Inputs::default(), tempfile::tempdir().unwrap().path(), 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("HF_HUB_OFFLINE") && err.contains("--repo-type dataset"), "{err}");
    // A malformed reference is a config error at `root`.
    let mut bad = cfg;
    bad["root"] = json!("hf:a b/c");
    let err = testing::run(&Ingest, &bad, &Inputs::default(), tempfile::tempdir().unwrap().path(), 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("root") && err.contains("hf:ORG/NAME"), "{err}");
}
