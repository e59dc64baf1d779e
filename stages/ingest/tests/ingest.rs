//! The ingest stage on the real fashion data ($HUSE_ASSETS) and on small hand-made tables.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use huse_data::{ClassTree, Item, Split};
use huse_stage_api::{Inputs, Stage, testing};
use huse_stage_ingest::Ingest;
use serde_json::json;

fn fashion() -> PathBuf {
    PathBuf::from(std::env::var("HUSE_ASSETS").expect("set HUSE_ASSETS")).join("data/fashion-product-images-small")
}

fn run(cfg: serde_json::Value, out: &Path) -> Result<(Vec<Item>, ClassTree, testing::Recorded), String> {
    let m = testing::run(&Ingest, &cfg, &Inputs::default(), out, 0).map_err(|e| e.to_string())?;
    Ok((
        huse_data::read_items(&out.join("items.jsonl")).unwrap(),
        ClassTree::read(&out.join("classes.json")).unwrap(),
        m,
    ))
}

#[test]
fn full_fashion_data_with_min_20_gives_86_classes_and_a_stratified_split() {
    let out = tempfile::tempdir().unwrap();
    let cfg = json!({
        "root": fashion(), "classes": ["masterCategory", "subCategory", "articleType"],
        "min_items_per_class": 20, "check_images": "exists",
    });
    let (items, tree, m) = run(cfg.clone(), out.path()).unwrap();
    assert_eq!(m.last("data.rows"), Some(44072.0));
    // SOURCE.md: 168 distinct paths, 86 with >= 20 items; all rows are complete.
    assert_eq!(tree.classes.len(), 86);
    assert_eq!(tree.depth(), 3);
    let dropped = m.last("data.dropped_small_class_items").unwrap() as usize;
    assert_eq!(items.len() + dropped, 44072);
    // Leaf classes are whole paths: an articleType under two subCategories is two classes.
    let mut leaf_names: HashMap<&str, usize> = HashMap::new();
    for c in &tree.classes {
        *leaf_names.entry(c.path[2].as_str()).or_default() += 1;
        assert!(c.count >= 20);
    }
    // Per-class proportions: every class's test and val shares are within one item of 10%.
    let mut per: HashMap<usize, [usize; 3]> = HashMap::new();
    for it in &items {
        let e = per.entry(it.class).or_default();
        e[match it.split {
            Split::Train => 0,
            Split::Val => 1,
            Split::Test => 2,
        }] += 1;
    }
    for (c, [tr, va, te]) in &per {
        let n = (tr + va + te) as f64;
        assert!(
            (*va as f64 - 0.1 * n).abs() <= 1.0 && (*te as f64 - 0.1 * n).abs() <= 1.0,
            "class {c}: {tr}/{va}/{te}"
        );
        assert_eq!(tree.classes[*c].count, tr + va + te);
    }
    let test_share = items.iter().filter(|i| i.split == Split::Test).count() as f64 / items.len() as f64;
    assert!((test_share - 0.1).abs() < 0.005, "{test_share}");
    // The same seed gives the same split; another seed another one.
    let out2 = tempfile::tempdir().unwrap();
    let (again, _, _) = run(cfg.clone(), out2.path()).unwrap();
    assert_eq!(again, items);
    let mut other = cfg.clone();
    other["split"] = json!({"seed": 1});
    let out3 = tempfile::tempdir().unwrap();
    let (moved, _, _) = run(other, out3.path()).unwrap();
    assert_ne!(moved.iter().map(|i| i.split).collect::<Vec<_>>(), items.iter().map(|i| i.split).collect::<Vec<_>>());
}

/// A small dataset in a temp dir: real JPEGs copied from the fashion data.
fn small_dataset(dir: &Path, table: &str) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    for id in ["1163", "1164", "1165", "1525"] {
        std::fs::copy(fashion().join(format!("images/{id}.jpg")), dir.join(format!("images/{id}.jpg"))).unwrap();
    }
    std::fs::write(dir.join("table.csv"), table).unwrap();
}

#[test]
fn the_seed_layout_with_one_separated_class_column() {
    let d = tempfile::tempdir().unwrap();
    small_dataset(
        d.path(),
        "image,text,classes\nimages/1163.jpg,red shirt,apparel<top<shirt\nimages/1164.jpg,\"blue, long shirt\",apparel<top<shirt\n\
         images/1165.jpg,boot,shoes<boots<ankle\nimages/1525.jpg,bag,bags<backpack\n",
    );
    let out = tempfile::tempdir().unwrap();
    let (items, tree, _) = run(
        json!({"root": d.path(), "table": "table.csv", "id_column": "image", "image": "{image}", "text_column": "text", "class_column": "classes"}),
        out.path(),
    )
    .unwrap();
    assert_eq!(items.len(), 4);
    assert_eq!(items[1].text, "blue, long shirt");
    let names: Vec<&str> = tree.classes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["apparel<top<shirt", "bags<backpack", "shoes<boots<ankle"]);
    assert_eq!(tree.classes[0].count, 2);
    assert!(items[0].image.ends_with("images/1163.jpg") && Path::new(&items[0].image).is_absolute());
}

#[test]
fn attribute_columns_are_kept_with_a_query_and_a_missing_one_is_named() {
    let d = tempfile::tempdir().unwrap();
    small_dataset(
        d.path(),
        "image,text,colour,usage,classes\nimages/1163.jpg,red shirt,Navy Blue,Casual,apparel<top<Shirts\n\
         images/1164.jpg,blue shirt,,Formal,apparel<top<Shirts\nimages/1165.jpg,boot,Black,,shoes<Boots\n\
         images/1525.jpg,bag,Red,Casual,bags<backpack\n",
    );
    let cfg = |attributes: serde_json::Value| {
        json!({"root": d.path(), "table": "table.csv", "id_column": "image", "image": "{image}", "text_column": "text",
               "class_column": "classes", "attributes": attributes})
    };
    let out = tempfile::tempdir().unwrap();
    let (items, _, _) = run(cfg(json!(["colour", "usage"])), out.path()).unwrap();
    assert_eq!(items[0].attrs["colour"], "Navy Blue");
    assert_eq!(items[0].query.as_deref(), Some("navy blue casual shirts"));
    // An empty value stays in `attrs` (unknown) and out of the query.
    assert_eq!(items[1].attrs["colour"], "");
    assert_eq!(items[1].query.as_deref(), Some("formal shirts"));
    assert_eq!(items[2].query.as_deref(), Some("black boots"));
    // Without `attributes:` the items are written exactly as before.
    let plain = tempfile::tempdir().unwrap();
    run(cfg(json!([])), plain.path()).unwrap();
    let text = std::fs::read_to_string(plain.path().join("items.jsonl")).unwrap();
    assert!(!text.contains("attrs") && !text.contains("query"), "{text}");
    let e = run(cfg(json!(["colour", "colur"])), tempfile::tempdir().unwrap().path()).unwrap_err();
    assert!(e.contains("attributes.1") && e.contains("column `colur`"), "{e}");
}

#[test]
fn bad_rows_are_named_or_skipped_and_counted() {
    let d = tempfile::tempdir().unwrap();
    small_dataset(
        d.path(),
        "id,a,b,title\n1163,Apparel,Topwear,shirt one\n1164,Apparel,,shirt two\n1165,Apparel,Topwear,\n1525,Bags,Backpack,bag\n9999,Bags,Backpack,ghost\n8888,Bags,Backpack,broken\n",
    );
    std::fs::write(d.path().join("images/8888.jpg"), b"not a jpeg at all").unwrap();
    let base = json!({"root": d.path(), "table": "table.csv", "text_column": "title", "classes": ["a", "b"]});
    let cases = [
        ("3", "id 1164", "column `b`", "missing class level"),
        ("4", "id 1165", "column `title`", "empty text"),
        ("6", "id 9999", "column `id`", "does not exist"),
        ("7", "id 8888", "column `id`", "cannot be decoded"),
    ];
    // With `error`, the first bad row stops the stage; fix rows one by one to see each message.
    let mut table: Vec<String> =
        std::fs::read_to_string(d.path().join("table.csv")).unwrap().lines().map(String::from).collect();
    let good_rows = table.clone();
    for (row, id, column, what) in cases {
        let out = tempfile::tempdir().unwrap();
        let err = run(base.clone(), out.path()).unwrap_err();
        for part in [&format!("row {row}"), id, column, what] {
            assert!(err.contains(part), "expected `{part}` in: {err}");
        }
        // Replace that row by a good one (row numbers stay) and go on.
        let line: usize = row.parse().unwrap();
        table[line - 1] = good_rows[1].clone();
        std::fs::write(d.path().join("table.csv"), table.join("\n") + "\n").unwrap();
    }
    // With `skip`, every bad row is skipped and counted.
    std::fs::write(d.path().join("table.csv"), good_rows.join("\n") + "\n").unwrap();
    let mut skip = base.clone();
    skip["bad_rows"] = json!("skip");
    let out = tempfile::tempdir().unwrap();
    let (items, _, m) = run(skip, out.path()).unwrap();
    assert_eq!(items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["1163", "1525"]);
    for k in [
        "data.skipped.missing_class",
        "data.skipped.empty_text",
        "data.skipped.missing_image",
        "data.skipped.undecodable_image",
    ] {
        assert_eq!(m.last(k), Some(1.0), "{k}");
    }
}

#[test]
fn config_errors_name_the_key() {
    let d = tempfile::tempdir().unwrap();
    small_dataset(d.path(), "id,a\n1163,x\n");
    let cases = [
        (json!({"root": d.path(), "table": "table.csv"}), "classes"),
        (json!({"root": d.path(), "table": "table.csv", "classes": ["a"], "class_column": "a"}), "class_column"),
        (json!({"root": d.path(), "classes": ["a"], "split": {"train": 0.5, "val": 0.1, "test": 0.1}}), "split"),
        (json!({"root": d.path(), "classes": ["a"], "min_items_per_class": 0}), "min_items_per_class"),
    ];
    for (cfg, key) in cases {
        let e = <Ingest as huse_stage_api::Stage>::validate(&Ingest, &cfg).unwrap_err();
        assert_eq!(e.path.first().map(String::as_str), Some(key), "{e:?}");
    }
    // A column the table lacks is reported with the key that named it.
    let out = tempfile::tempdir().unwrap();
    let err =
        run(json!({"root": d.path(), "table": "table.csv", "classes": ["a", "zz"], "text_column": "a"}), out.path())
            .unwrap_err();
    assert!(err.contains("classes.1") && err.contains("column `zz` not in"), "{err}");
}

/// A catalog as researchers have it: the whole path in one JSON-wrapped string that ends
/// with the product's own name, more levels than wanted, and a title plus a description.
const CATALOG: &str = "\
id,category_tree,title,description
1163,\"[\"\"Apparel >> Topwear >> Tshirts >> Jersey >> Nike Sahara Jersey\"\"]\",Nike Sahara Jersey,Round neck fanwear
1164,\"[\"\"Apparel >> Topwear >> Tshirts >> Polo >> Nike Blue Polo\"\"]\",Nike Blue Polo,
1165,Footwear >> Shoes >> Nike Boot,Nike Boot,  Leather   ankle boot
1525,\"[\"\"Bags >> Backpack\"\"]\",Puma Backpack,A bag
";

fn catalog_cfg(d: &Path) -> serde_json::Value {
    json!({
        "root": d, "table": "table.csv", "class_column": "category_tree", "class_separator": " >> ",
        "class_drop_last": true, "class_levels": 3, "text": "{title}. {description}", "bad_rows": "skip",
    })
}

#[test]
fn a_wrapped_path_column_and_a_text_template_need_only_yaml() {
    let d = tempfile::tempdir().unwrap();
    small_dataset(d.path(), CATALOG);
    let out = tempfile::tempdir().unwrap();
    let (items, tree, m) = run(catalog_cfg(d.path()), out.path()).unwrap();
    let by_id: HashMap<&str, &Item> = items.iter().map(|i| (i.id.as_str(), i)).collect();
    let class = |id: &str| tree.classes[by_id[id].class].name.clone();
    // Unwrapped, the product name dropped, cut to 3 levels.
    assert_eq!(class("1163"), "Apparel<Topwear<Tshirts");
    assert_eq!(class("1164"), "Apparel<Topwear<Tshirts");
    // Too short after dropping the name (2 levels < 3): a bad row, skipped and counted.
    assert!(!by_id.contains_key("1165") && !by_id.contains_key("1525"));
    assert_eq!(m.last("data.skipped.bad_class_path"), Some(2.0));
    // Title and description joined; an empty description collapses with its separator.
    assert_eq!(by_id["1163"].text, "Nike Sahara Jersey. Round neck fanwear");
    assert_eq!(by_id["1164"].text, "Nike Blue Polo");

    // `class_pad: repeat` keeps the short paths, repeating their last level.
    let mut cfg = catalog_cfg(d.path());
    cfg["class_pad"] = json!("repeat");
    let out = tempfile::tempdir().unwrap();
    let (items, tree, _) = run(cfg, out.path()).unwrap();
    let names: Vec<&str> = tree.classes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["Apparel<Topwear<Tshirts", "Bags<Bags<Bags", "Footwear<Shoes<Shoes"]);
    let boot = items.iter().find(|i| i.id == "1165").unwrap();
    assert_eq!(boot.text, "Nike Boot. Leather ankle boot", "whitespace runs collapse");
}

#[test]
fn bad_class_paths_and_template_columns_name_the_row_the_value_and_the_key() {
    let d = tempfile::tempdir().unwrap();
    small_dataset(d.path(), &format!("{CATALOG}1166,[],Empty,\n"));
    let mut cfg = catalog_cfg(d.path());
    cfg["bad_rows"] = json!("error");
    let out = tempfile::tempdir().unwrap();
    let err = run(cfg, out.path()).unwrap_err();
    assert!(err.contains("row 4 (id 1165), column `category_tree`: class path \"Footwear >> Shoes >> Nike Boot\": 2 level(s), fewer than class_levels 3"), "{err}");
    // A misspelt template column is a config error at `text`, before anything runs.
    let mut cfg = catalog_cfg(d.path());
    cfg["text"] = json!("{titel}. {description}");
    let e = Ingest.validate(&cfg).unwrap_err();
    assert_eq!(e.path, vec!["text"]);
    assert!(e.message.contains("column `titel` is not in table.csv; did you mean `title`?"), "{}", e.message);
    let mut cfg = catalog_cfg(d.path());
    cfg["text"] = json!("no columns");
    assert!(Ingest.validate(&cfg).unwrap_err().message.contains("names no column"));
    // Unit cases of the path rule.
    use huse_stage_ingest::{ClassPad, class_path};
    assert_eq!(class_path("[\"a/b/c\"]", "/", false, None, ClassPad::Drop).unwrap(), ["a", "b", "c"]);
    assert!(class_path("[]", "/", false, None, ClassPad::Drop).unwrap_err().contains("empty JSON list"));
    assert!(class_path("[1]", "/", false, None, ClassPad::Drop).unwrap_err().contains("not a string"));
    assert!(class_path("a", "/", true, None, ClassPad::Drop).unwrap_err().contains("no level left"));
    assert!(class_path("a//c", "/", false, None, ClassPad::Drop).unwrap_err().contains("empty level"));
    assert_eq!(class_path("a/b/c/d", "/", false, Some(2), ClassPad::Drop).unwrap(), ["a", "b"]);
}

#[test]
fn text_cleaning_is_part_of_ingest() {
    let d = tempfile::tempdir().unwrap();
    small_dataset(
        d.path(),
        "id,title,description,cls\n1163,Nike <b>Jersey</b>,Cotton &amp; silk!!! see https://x.example/a,A<B\n1164,Nike Polo,,A<B\n",
    );
    let out = tempfile::tempdir().unwrap();
    let cfg = json!({
        "root": d.path(), "table": "table.csv", "class_column": "cls", "text": "{title}. {description}",
        "clean": { "html": true, "urls": true, "punctuation": true, "lowercase": true, "replace": [["jersey", "tee"]] },
    });
    let (items, _, _) = run(cfg.clone(), out.path()).unwrap();
    assert_eq!(items[0].text, "nike tee. cotton & silk! see");
    assert_eq!(items[1].text, "nike polo");
    let mut bad = cfg;
    bad["clean"]["replace"] = json!([["(", ""]]);
    let e = Ingest.validate(&bad).unwrap_err();
    assert_eq!(e.path, vec!["clean", "replace", "0"]);
}

/// A local HTTP server for the URL tests: `/img/ID.jpg` serves the fashion image ID, `/down/...`
/// answers 503 every time, anything else 404. Returns the base URL and the request count.
fn image_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            loop {
                let mut hd = String::new();
                if r.read_line(&mut hd).is_err() || hd == "\r\n" || hd.is_empty() {
                    break;
                }
            }
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let (status, body) = match path.strip_prefix("/img/") {
                Some(name) => match std::fs::read(fashion().join("images").join(name)) {
                    Ok(b) => ("200 OK", b),
                    Err(_) => ("404 Not Found", b"no".to_vec()),
                },
                None if path.starts_with("/down/") => ("503 Service Unavailable", b"busy".to_vec()),
                None => ("404 Not Found", b"no".to_vec()),
            };
            let _ = write!(c, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = c.write_all(&body);
        }
    });
    (base, hits)
}

#[test]
fn image_urls_are_downloaded_once_and_failures_follow_bad_rows() {
    let (base, hits) = image_server();
    let d = tempfile::tempdir().unwrap();
    let downloads = d.path().join("downloads");
    std::fs::write(
        d.path().join("table.csv"),
        format!(
            "id,url,cat,sub,title\n1163,{base}/img/1163.jpg,Apparel,Topwear,shirt one\n1164,{base}/img/1164.jpg,Apparel,Topwear,shirt two\n\
             1165,{base}/img/1165.jpg,Footwear,Shoes,boot\n1525,{base}/img/1525.jpg,Accessories,Bags,bag\n\
             7777,{base}/img/1163.jpg,Apparel,Topwear,same image again\n9999,{base}/img/nope.jpg,Bags,Bags,gone\n8888,{base}/down/x.jpg,Bags,Bags,server down\n"
        ),
    )
    .unwrap();
    let cfg = json!({
        "root": d.path(), "table": "table.csv", "image": "{url}", "text_column": "title", "classes": ["cat", "sub"],
        "check_images": "decode", "bad_rows": "skip",
        "download": {"dir": downloads, "concurrency": 3, "retries": 1, "timeout_s": 10},
    });
    let out = tempfile::tempdir().unwrap();
    let (items, _, m) = run(cfg.clone(), out.path()).unwrap();
    assert_eq!(items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["1163", "1164", "1165", "1525", "7777"]);
    assert_eq!(m.last("data.skipped.download_failed"), Some(2.0), "the 404 and the server that stays down");
    // Content-addressed: the same image under two ids is one file; its bytes are the served ones.
    assert_eq!(items[0].image, items[4].image);
    assert_eq!(std::fs::read(&items[2].image).unwrap(), std::fs::read(fashion().join("images/1165.jpg")).unwrap());
    assert!(Path::new(&items[0].image).starts_with(&downloads));
    // 5 distinct good or missing URLs once each (the 404 is not retried), the 503 twice.
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 5 + 2);
    // A second run downloads nothing again: only the two failures are asked again.
    let out2 = tempfile::tempdir().unwrap();
    let (again, _, _) = run(cfg.clone(), out2.path()).unwrap();
    assert_eq!(again, items);
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 7 + 1 + 2);
    // With `bad_rows: error` the failed download names the row, the id, the column and the URL.
    let mut strict = cfg.clone();
    strict["bad_rows"] = json!("error");
    let err = run(strict, tempfile::tempdir().unwrap().path()).unwrap_err();
    for part in ["row 7", "id 9999", "column `url`", "/img/nope.jpg", "HTTP 404"] {
        assert!(err.contains(part), "expected `{part}` in: {err}");
    }
    // Bad download settings are config errors at their key.
    let mut bad = cfg;
    bad["download"]["concurrency"] = json!(0);
    let err = run(bad, tempfile::tempdir().unwrap().path()).unwrap_err();
    assert!(err.contains("download.concurrency"), "{err}");
}

#[test]
fn an_unterminated_quote_is_an_error_naming_the_line_where_it_opened() {
    let d = tempfile::tempdir().unwrap();
    // Row 3's title opens a quote that is never closed: rows 4 and 5 would become part of it.
    small_dataset(
        d.path(),
        "id,a,b,title\n1525,Bags,Backpack,bag one\n1163,Apparel,Topwear,\"shirt one\n1164,Apparel,Topwear,shirt two\n1165,Apparel,Topwear,shirt three\n",
    );
    let base = json!({"root": d.path(), "table": "table.csv", "text_column": "title", "classes": ["a", "b"], "min_items_per_class": 1});
    let out = tempfile::tempdir().unwrap();
    let err = run(base.clone(), out.path()).unwrap_err();
    for part in ["row 3", "id 1163", "column `title`", "quote opened on line 3", "2 line(s)"] {
        assert!(err.contains(part), "expected `{part}` in: {err}");
    }
    let mut skip = base;
    skip["bad_rows"] = json!("skip");
    let out = tempfile::tempdir().unwrap();
    let (items, _, m) = run(skip, out.path()).unwrap();
    assert_eq!(items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["1525"]);
    assert_eq!(m.last("data.skipped.unterminated_quote"), Some(1.0));
}

#[test]
fn control_characters_are_errors_in_classes_and_ids_and_whitespace_in_text() {
    let d = tempfile::tempdir().unwrap();
    small_dataset(d.path(), "id,a,b,title\n1163,Apparel\0,Topwear,shirt\n1164,Apparel,Topwear,two\n");
    let base = json!({"root": d.path(), "table": "table.csv", "text_column": "title", "classes": ["a", "b"], "min_items_per_class": 1});
    let out = tempfile::tempdir().unwrap();
    let err = run(base.clone(), out.path()).unwrap_err();
    assert!(err.contains("row 2") && err.contains("column `a`") && err.contains("control character"), "{err}");
    // One column class paths too, and ids.
    std::fs::write(d.path().join("table.csv"), "id,cls,title\n1163,Apparel<Top\u{1b}wear,shirt\n").unwrap();
    let one = json!({"root": d.path(), "table": "table.csv", "text_column": "title", "class_column": "cls", "min_items_per_class": 1});
    let err = run(one, out.path()).unwrap_err();
    assert!(err.contains("column `cls`") && err.contains("control character"), "{err}");
    std::fs::write(d.path().join("table.csv"), "id,a,b,title\n11\u{7}63,Apparel,Topwear,shirt\n").unwrap();
    let err = run(base.clone(), out.path()).unwrap_err();
    assert!(err.contains("column `id`") && err.contains("control character"), "{err}");
    // In text they are whitespace: cleaned like it.
    std::fs::write(
        d.path().join("table.csv"),
        "id,a,b,title\n1163,Apparel,Topwear,\"red\0shirt\u{1b}[31m  with\ttabs\"\n",
    )
    .unwrap();
    let (items, tree, _) = run(base, out.path()).unwrap();
    assert_eq!(items[0].text, "red shirt [31m with tabs");
    assert_eq!(tree.classes.len(), 1);
}

#[test]
fn image_paths_stay_inside_the_dataset_root_unless_allowed() {
    let d = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::copy(fashion().join("images/1525.jpg"), outside.path().join("x.jpg")).unwrap();
    let abs = outside.path().join("x.jpg");
    let climb = format!("../{}/x.jpg", outside.path().file_name().unwrap().to_string_lossy());
    small_dataset(
        d.path(),
        &format!(
            "img,a,b,title\nimages/1163.jpg,Apparel,Topwear,shirt\n{climb},Bags,Backpack,bag\n{},Bags,Backpack,other bag\n",
            abs.display()
        ),
    );
    // Both temp folders share a parent, so the climbing path names a real file: it is refused for where it leads.
    assert!(d.path().join(&climb).is_file());
    let base = json!({"root": d.path(), "table": "table.csv", "image": "{img}", "id_column": "img", "text_column": "title", "classes": ["a", "b"], "min_items_per_class": 1});
    let out = tempfile::tempdir().unwrap();
    let err = run(base.clone(), out.path()).unwrap_err();
    assert!(
        err.contains("row 3") && err.contains("leads outside the dataset root") && err.contains("allow_outside_root"),
        "{err}"
    );
    let mut skip = base.clone();
    skip["bad_rows"] = json!("skip");
    let (items, _, m) = run(skip, out.path()).unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(m.last("data.skipped.image_outside_root"), Some(2.0));
    let mut allow = base;
    allow["allow_outside_root"] = json!(true);
    let (items, _, _) = run(allow, out.path()).unwrap();
    assert_eq!(items.len(), 3);
}
