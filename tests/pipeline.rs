//! The HUSE pipeline end to end through the `huse-run` binary on a small slice of the real
//! fashion data: ingest -> graph + encode -> train -> evaluate. Checks that training
//! learns, that the same seed gives the same loss curve bit for bit, that an interrupted
//! training resumes from its checkpoint onto the same curve, and that a diverging loss
//! stops the run with a clear error.

mod common;

use common::Sandbox;

fn experiment(sb: &Sandbox) -> String {
    let assets = std::env::var("HUSE_ASSETS").expect("set HUSE_ASSETS");
    let yaml = format!(
        "name: tiny
seed: 7
device: cpu
stages:
  ingest:
    uses: ingest
    with:
      root: {assets}/data/fashion-product-images-small
      classes: [masterCategory, subCategory, articleType]
      per_class_cap: 40
      min_items_per_class: 40
      check_images: exists
      split: {{ train: 0.6, val: 0.2, test: 0.2 }}
  graph: {{ uses: graph, needs: [ingest], with: {{ model: {assets}/models/all-MiniLM-L6-v2 }} }}
  encode:
    uses: encode
    needs: [ingest]
    with:
      text_model: {assets}/models/all-MiniLM-L6-v2
      image_model: {{ weights: {assets}/torch/hub/checkpoints/mobilenet_v2-b0353104.pth }}
      image_size: 64
      tfidf: {{ max_features: 512, min_df: 2 }}
  train:
    uses: train
    needs: [ingest, encode, graph]
    with:
      optimizer: {{ name: adamw, lr: 0.002 }}
      batch_size: 64
      epochs: 12
  evaluate: {{ uses: evaluate, needs: [ingest, encode, train] }}
"
    );
    sb.write("tiny.yaml", &yaml).display().to_string()
}

/// The train stage under another kind.
struct Distill(huse_stage_train::Train);

impl huse_stage_api::Stage for Distill {
    fn kind(&self) -> &str {
        "distill"
    }
    fn version(&self) -> &str {
        self.0.version()
    }
    fn inputs(&self) -> Vec<huse_stage_api::Input> {
        self.0.inputs()
    }
    fn outputs(&self) -> Vec<huse_stage_api::Output> {
        self.0.outputs()
    }
    fn uses_seed(&self) -> bool {
        self.0.uses_seed()
    }
    fn uses_device(&self) -> bool {
        self.0.uses_device()
    }
    fn validate(&self, config: &huse_stage_api::Config) -> Result<(), huse_stage_api::ConfigError> {
        self.0.validate(config)
    }
    fn run(
        &self,
        ctx: &huse_stage_api::Context,
        config: &huse_stage_api::Config,
        inputs: &huse_stage_api::Inputs,
    ) -> Result<(), huse_stage_api::StageError> {
        self.0.run(ctx, config, inputs)
    }
}

/// Runs `tiny` (cached stages reused) with its model made by a `distill` stage, in this
/// process with a registry that has the kind; returns the run's id.
fn run_with_a_distill_stage(sb: &Sandbox, file: &str) -> i64 {
    let yaml = std::fs::read_to_string(file)
        .unwrap()
        .replace("name: tiny", "name: tiny-distill")
        .replace("  train:\n    uses: train\n", "  distill:\n    uses: distill\n")
        .replace("needs: [ingest, encode, train]", "needs: [ingest, encode, distill]")
        .replace("epochs: 12", "epochs: 2");
    assert!(yaml.contains("uses: distill"), "{yaml}");
    let mut registry = huse_run::builtin_registry();
    registry.add(std::sync::Arc::new(Distill(huse_stage_train::Train)), "test");
    let exp =
        huse_config::compile_str(&yaml, "distill.yaml", &Default::default(), &registry, &|k| std::env::var(k).ok())
            .unwrap_or_else(|e| panic!("{e:?}"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let store = huse_store::Store::open(&huse_store::Location::Sqlite(sb.db()), huse_store::Options::default())
            .await
            .unwrap();
        let cache = huse_exec::cache::Cache::open(sb.cache()).unwrap();
        let opts = huse_exec::RunOptions { jobs: 2, ..Default::default() };
        let display = huse_exec::progress::Display::quiet();
        let out =
            huse_exec::execute(&exp, &registry, &store, &cache, &opts, &display, &Default::default()).await.unwrap();
        assert_eq!(out.runs[0].status, huse_store::RunStatus::Succeeded, "{:?}", out.runs[0].error);
        store.close().await;
        out.runs[0].id
    })
}

fn curve(sb: &Sandbox, run: i64, key: &str) -> Vec<String> {
    // Full precision text of every step's value.
    sb.sql(&format!("SELECT printf('%.17g', value) FROM metrics WHERE run_id = {run} AND key = '{key}' ORDER BY step"))
        .into_iter()
        .map(|r| r[0].clone())
        .collect()
}

fn value(sb: &Sandbox, run: i64, key: &str) -> f64 {
    sb.sql(&format!("SELECT value FROM final_metrics WHERE run_id = {run} AND key = '{key}'"))[0][0].parse().unwrap()
}

#[test]
fn huse_learns_is_deterministic_and_resumes() {
    let sb = Sandbox::new();
    let f = experiment(&sb);
    let out = sb.run(&[&f]).expect(0);
    assert!(out.stdout().contains("succeeded"), "{}", out.stdout());
    // Training's progress (plain lines here, not a terminal) shows the running loss and,
    // from the second epoch, the last validation accuracy.
    let err = out.stderr();
    let epoch2 = err.lines().find(|l| l.contains("[train] epoch 2/")).unwrap_or_else(|| panic!("{err}"));
    assert!(epoch2.contains(" loss ") && epoch2.contains(", val acc 0.") && epoch2.contains("(epoch 1)"), "{epoch2}");
    // The run ends by printing the paper's three tables; `show` prints them again.
    for table in ["Table 1 — Recall@1/5/10 (test split)", "Table 2 — HP@2/5/10", "Table 3 — classification accuracy"]
    {
        assert!(out.stdout().contains(table), "{table} missing from:\n{}", out.stdout());
        assert!(sb.run(&["show", "1"]).expect(0).stdout().contains(table));
    }
    let classes = value(&sb, 1, "data.classes");
    assert!(classes >= 30.0, "{classes} classes");
    // Learning: validation accuracy far above chance, and the losses fall.
    let chance = 1.0 / classes;
    let acc = value(&sb, 1, "val.acc.both");
    assert!(acc > 10.0 * chance, "val.acc.both {acc} vs chance {chance}");
    for key in ["train.loss", "train.loss_class"] {
        let c: Vec<f64> = curve(&sb, 1, key).iter().map(|v| v.parse().unwrap()).collect();
        assert_eq!(c.len(), 12, "{key}: one value per epoch in the database");
        assert!(c[11] < c[0], "{key} must fall: {c:?}");
    }
    // The gap stays small: an item's image and text embeddings stay close (cos > 0.7).
    let gap: Vec<f64> = curve(&sb, 1, "train.loss_gap").iter().map(|v| v.parse().unwrap()).collect();
    assert!(gap.iter().all(|g| *g < 0.3), "{gap:?}");
    // Evaluate wrote the three tables' metrics.
    for key in [
        "test.i2i.r1",
        "test.t2i.r10",
        "test.hp5.i2t",
        "test.acc.both",
        "test.acc.image.l0",
        "test.inst.i2t.r1",
        "test.inst.t2i.r10",
    ] {
        let v = value(&sb, 1, key);
        assert!((0.0..=1.0).contains(&v), "{key} = {v}");
    }
    assert!(value(&sb, 1, "test.acc.text") > 10.0 * chance);
    // And the validation split's retrieval figures (what a study may choose by); its accuracies
    // stay train's alone (one stage per name).
    for key in ["val.t2i.r1", "val.i2t.r10", "val.hp5.t2i", "val.inst.t2i.r10", "val.acc.both.l0"] {
        let v = value(&sb, 1, key);
        assert!((0.0..=1.0).contains(&v), "{key} = {v}");
    }
    assert_eq!(
        sb.sql("SELECT stage FROM final_metrics WHERE run_id = 1 AND key = 'val.acc.both'"),
        [["train".to_string()]]
    );
    // Instance retrieval: an item's text ranks its own image far better than chance (the
    // median rank of a random order would be about half the test split).
    let medr = value(&sb, 1, "test.inst.t2i.medr");
    assert!((1.0..60.0).contains(&medr), "median rank {medr} (a random order gives about half of the ~240 test items)");
    assert!(out.stdout().contains("Table 4 — instance retrieval"), "{}", out.stdout());
    // Every output file of every stage has the same permissions (libraries that write
    // safetensors may choose 0600; the cache normalises them).
    {
        use std::os::unix::fs::PermissionsExt;
        let mut modes = std::collections::BTreeMap::new();
        for row in sb.sql("SELECT stage, output_dir FROM stage_runs WHERE run_id = 1") {
            for e in std::fs::read_dir(&row[1]).unwrap() {
                let e = e.unwrap();
                modes.insert(
                    format!("{}/{}", row[0], e.file_name().to_string_lossy()),
                    e.metadata().unwrap().permissions().mode() & 0o777,
                );
            }
        }
        let distinct: std::collections::BTreeSet<_> = modes.values().collect();
        assert_eq!(distinct.len(), 1, "mixed output permissions: {modes:?}");
    }

    // Same seed, same data: the same loss curve, bit for bit.
    sb.run(&[&f, "--force", "train"]).expect(0);
    assert_eq!(curve(&sb, 2, "train.loss"), curve(&sb, 1, "train.loss"));
    assert_eq!(curve(&sb, 2, "val.acc.both"), curve(&sb, 1, "val.acc.both"));
    // Another seed: another curve.
    sb.run(&[&f, "--set", "seed=8"]).expect(0);
    assert_ne!(curve(&sb, 3, "train.loss"), curve(&sb, 1, "train.loss"));

    // Interrupt training after its first epoch, then resume: the same curve as run 1.
    let mut child = sb
        .cmd(&[&f, "--force", "train"])
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    loop {
        let rows = sb.sql("SELECT count(*) FROM metrics WHERE run_id = 4 AND key = 'train.loss'");
        if rows[0][0] != "0" {
            break;
        }
        assert!(t0.elapsed().as_secs() < 120, "training never logged an epoch");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert_eq!(sb.sql("SELECT status FROM runs WHERE id = 4")[0][0], "interrupted");
    let done = curve(&sb, 4, "train.loss").len();
    assert!(done < 12, "interrupted after {done} epochs");
    // (--force again: run 1's finished output is in the cache; the interrupted attempt's
    // checkpoint waits in the work directory of the same key.)
    sb.run(&[&f, "--force", "train"]).expect(0);
    let resumed_at = value(&sb, 5, "train.resumed_at_epoch");
    assert!(resumed_at >= 1.0, "resumed at epoch {resumed_at}");
    assert_eq!(curve(&sb, 5, "train.loss"), curve(&sb, 1, "train.loss"), "resumed curve equals the uninterrupted one");

    // What a trained run is for: find products by a sentence or a photo.
    let ingest = sb.sql("SELECT output_dir FROM stage_runs WHERE run_id = 1 AND stage = 'ingest'")[0][0].clone();
    let items: Vec<serde_json::Value> = std::fs::read_to_string(format!("{ingest}/items.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let classes: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{ingest}/classes.json")).unwrap()).unwrap();
    let class_of = |it: &serde_json::Value| {
        classes["classes"][it["class"].as_u64().unwrap() as usize]["name"].as_str().unwrap().to_string()
    };
    let tests: Vec<&serde_json::Value> = items.iter().filter(|i| i["split"] == "test").take(5).collect();
    for it in &tests {
        // In the text embeddings, a query built from an item's own title finds that very item
        // first, at distance 0: the query is encoded exactly as the encode stage encoded it.
        let csv = sb
            .run(&[
                "search",
                "1",
                "--text",
                it["text"].as_str().unwrap(),
                "--modality",
                "text",
                "-k",
                "10",
                "-f",
                "csv",
            ])
            .expect(0)
            .stdout();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "rank,id,title,class,split,distance");
        assert_eq!(lines.len(), 11, "{csv}");
        let first: Vec<&str> = lines[1].rsplitn(2, ',').collect();
        assert!(first[0].parse::<f64>().unwrap().abs() < 1e-4, "{csv}");
        assert!(
            lines[1..].iter().any(|l| l.contains(&format!(",{},", class_of(it)))),
            "the item's class is in the results: {csv}"
        );
        assert!(
            lines[1..].iter().any(|l| l.starts_with(&format!("1,{},", it["id"].as_str().unwrap()))
                || l.contains(&format!(",{},", it["id"].as_str().unwrap()))),
            "{csv}"
        );
    }
    // Across modalities (the default: a text query against the item images) every result is a
    // real item with a distance in [0, 2].
    let csv = sb
        .run(&["search", "1", "--text", tests[0]["text"].as_str().unwrap(), "-k", "3", "-f", "csv"])
        .expect(0)
        .stdout();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    // The query may also be the argument after the run: the same results.
    let positional =
        sb.run(&["search", "1", tests[0]["text"].as_str().unwrap(), "-k", "3", "-f", "csv"]).expect(0).stdout();
    assert_eq!(positional, csv);
    // By photo, in the text embeddings: the item's class again.
    let it = tests[0];
    let json = sb
        .run(&["search", "1", "--image", it["image"].as_str().unwrap(), "--modality", "text", "-k", "5", "-f", "json"])
        .expect(0)
        .stdout();
    let hits: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(hits.as_array().unwrap().len(), 5);
    assert!(
        hits.as_array()
            .unwrap()
            .iter()
            .all(|h| h["distance"].as_f64().unwrap() >= -1e-4 && h["distance"].as_f64().unwrap() <= 2.0001)
    );
    let err = sb.run(&["search", "1", "--text", "   "]).expect(1).stderr();
    assert!(err.contains("the query text is empty"), "{err}");
    // Embeddings of the test split, with ids, from the cached index.
    let out = sb.path().join("emb");
    sb.run(&["embed", "1", "--split", "test", "--out", out.to_str().unwrap()]).expect(0);
    let ids: Vec<String> = serde_json::from_slice(&std::fs::read(out.join("ids.json")).unwrap()).unwrap();
    assert_eq!(ids.len(), items.iter().filter(|i| i["split"] == "test").count());
    let t = candle_core::safetensors::load(out.join("embeddings.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(t["image"].dims(), &[ids.len(), 512]);
    let norms: Vec<f32> = t["text"].sqr().unwrap().sum(1).unwrap().to_vec1().unwrap();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-3), "unit embeddings");
    // A new table in the run's ingest layout (three of the test items, copied): embedded with
    // the run, its rows match the run's own embeddings of the same items.
    let assets =
        std::path::PathBuf::from(std::env::var("HUSE_ASSETS").unwrap()).join("data/fashion-product-images-small");
    let new = sb.path().join("new");
    std::fs::create_dir_all(new.join("images")).unwrap();
    let table = std::fs::read_to_string(assets.join("styles.csv")).unwrap();
    let pick: Vec<&str> = tests[..3].iter().map(|i| i["id"].as_str().unwrap()).collect();
    let mut csv = table.lines().next().unwrap().to_string() + "\n";
    for id in &pick {
        csv += table.lines().find(|l| l.starts_with(&format!("{id},"))).unwrap();
        csv += "\n";
        std::fs::copy(assets.join(format!("images/{id}.jpg")), new.join(format!("images/{id}.jpg"))).unwrap();
    }
    std::fs::write(new.join("styles.csv"), csv).unwrap();
    let out2 = sb.path().join("emb-new");
    sb.run(&["embed", "1", "--data", new.to_str().unwrap(), "--out", out2.to_str().unwrap()]).expect(0);
    let new_ids: Vec<String> = serde_json::from_slice(&std::fs::read(out2.join("ids.json")).unwrap()).unwrap();
    assert_eq!(new_ids, pick);
    let t2 = candle_core::safetensors::load(out2.join("embeddings.safetensors"), &candle_core::Device::Cpu).unwrap();
    for m in ["image", "text"] {
        let a: Vec<Vec<f32>> = t2[m].to_vec2().unwrap();
        let b: Vec<Vec<f32>> = t[m].to_vec2().unwrap();
        for (k, id) in new_ids.iter().enumerate() {
            let row = ids.iter().position(|x| x == id).unwrap();
            let cos: f32 = a[k].iter().zip(&b[row]).map(|(x, y)| x * y).sum();
            assert!(cos > 0.999, "{m} embedding of {id}: cosine {cos} to the run's own");
        }
    }

    serve_answers_as_search_does(&sb, tests[0]);
    the_results_app_searches_a_trained_run(&sb, tests[0]);

    // A stage kind the runner has never heard of (`distill`: here the train stage under
    // another kind, as a plugin or a crate of one's own would register it) produces the
    // model; `search`, `embed` and `serve` find it by its artifacts, not by a kind's name.
    let id = run_with_a_distill_stage(&sb, &f).to_string();
    let title = tests[0]["text"].as_str().unwrap();
    let hits = sb.run(&["search", &id, "--text", title, "-k", "3", "-f", "csv"]).expect(0).stdout();
    assert_eq!(hits.lines().count(), 4, "{hits}");
    assert_eq!(
        sb.sql(&format!("SELECT kind FROM stage_runs WHERE run_id = {id} AND stage = 'distill'"))[0][0],
        "distill"
    );

    // The report's retrieval gallery: fixed test queries, the runs' top 5 photos, copied
    // beside the page; every image it shows exists.
    let rep = sb.path().join("rep");
    sb.run(&["report", "tiny", "--out", rep.to_str().unwrap()]).expect(0);
    let html = std::fs::read_to_string(rep.join("index.html")).unwrap();
    assert!(html.contains("<h2>Retrieval gallery</h2>"), "no gallery");
    let thumbs: Vec<&str> = html.split("src=\"thumbs/").skip(1).map(|s| s.split('"').next().unwrap()).collect();
    assert!(thumbs.len() >= 8 * 5, "{} thumbnails", thumbs.len());
    assert!(thumbs.iter().all(|t| rep.join("thumbs").join(t).is_file()));
    assert!(html.contains("border:3px solid #2a2"), "some photo has the query's class");
    assert!(html.contains("curve-train_loss.svg"), "overlaid training curves");
    let shot = sb.path().join("report.png");
    let ok = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1200,4000",
        ])
        .arg(format!("--user-data-dir={}", sb.path().join("chromium-report").display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", rep.join("index.html").display()))
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
    let img = image::open(&shot).unwrap().to_rgb8();
    let colours: std::collections::BTreeSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    assert!(colours.len() > 200, "the report shows the gallery's photos ({} colours)", colours.len());

    // The contrastive term (`delta`): recorded as a param, its loss logged every epoch and
    // falling from ln(batch) (every text as likely as the own one) as training goes on.
    sb.run(&[&f, "--set", "train.delta=0.5", "--set", "train.tau=0.1"]).expect(0);
    let id: i64 = sb.sql("SELECT max(id) FROM runs")[0][0].parse().unwrap();
    let delta = sb.sql(&format!("SELECT value FROM params WHERE run_id = {id} AND key = 'train.delta'"));
    assert_eq!(delta[0][0].parse::<f64>().unwrap(), 0.5, "{delta:?}");
    let c: Vec<f64> = curve(&sb, id, "train.loss_contrastive").iter().map(|v| v.parse().unwrap()).collect();
    assert_eq!(c.len(), 12);
    assert!((c[0] - 64f64.ln()).abs() < 0.1 && c[11] < c[0] - 0.5, "{c:?}");
    assert!(curve(&sb, 1, "train.loss_contrastive").is_empty(), "delta 0 logs no contrastive loss");
    // A learned temperature: logged every epoch, starting from `tau`, moving, within [0.01, 1].
    sb.run(&[&f, "--set", "train.delta=0.5", "--set", "train.tau=0.1", "--set", "train.learn_tau=true"]).expect(0);
    let id: i64 = sb.sql("SELECT max(id) FROM runs")[0][0].parse().unwrap();
    let taus: Vec<f64> = curve(&sb, id, "train.tau").iter().map(|v| v.parse().unwrap()).collect();
    assert_eq!(taus.len(), 12, "{taus:?}");
    assert!(taus.iter().all(|t| (0.01 - 1e-6..=1.0).contains(t)) && (taus[11] - 0.1).abs() > 1e-3, "{taus:?}");

    // The attribute benchmark: ingest keeps colour and usage, encode encodes each val/test
    // item's `<colour> <usage> <class>` query, evaluate searches the test images with them.
    let out = sb.run(&[&f, "--set", "ingest.attributes=[baseColour, usage]"]).expect(0);
    assert!(out.stdout().contains("Table 5 — attribute queries"), "{}", out.stdout());
    let id: i64 = sb.sql("SELECT max(id) FROM runs")[0][0].parse().unwrap();
    let share = |k: &str| value(&sb, id, k);
    let (class, colour, all) =
        (share("test.attr.class.p10"), share("test.attr.baseColour.p10"), share("test.attr.all.p10"));
    // The class is found above chance (a short query, unlike the titles the tiny model was
    // trained on); a colour match within the class cannot be more
    // common than the class, nor both attributes than one.
    assert!(class > 3.0 * chance && class <= 1.0, "class share {class} (chance {chance})");
    assert!(colour <= class && all <= colour && all > 0.0, "class {class}, colour {colour}, all {all}");
    let base = share("test.attr.baseColour.chance");
    assert!(base > 0.0 && base < 1.0, "{base}");
    assert!(share("test.attr.usage.p10") <= class);
}

/// A raw HTTP/1.1 exchange with the local server: (status, body).
fn http(addr: &str, request: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    // A server that refuses a body (413) may answer and close before the whole of it is sent:
    // the write then fails, and the answer is still there to read.
    let _ = c.write_all(request);
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

fn get(addr: &str, path: &str) -> (u16, String) {
    http(addr, format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
}

fn upload(addr: &str, name: &str, bytes: &[u8]) -> (u16, String) {
    let mut body = format!("--XB\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(b"\r\n--XB--\r\n");
    let mut req = format!(
        "POST /search HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: multipart/form-data; boundary=XB\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    http(addr, &req)
}

/// The ids of the result tiles of a page, in order.
fn tile_ids(html: &str) -> Vec<String> {
    html.split("data-id=\"").skip(1).map(|s| s.split('"').next().unwrap().to_string()).collect()
}

struct KillOnDrop(std::process::Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The results app's page of a trained run has the search box of `serve`, under the run's
/// own address, and it answers as `huse-run search` does.
fn the_results_app_searches_a_trained_run(sb: &Sandbox, item: &serde_json::Value) {
    let (_server, addr) = common::start_ui(sb, &["--device", "cpu"]);
    let (status, page) = get(&addr, "/run/1");
    assert_eq!(status, 200);
    assert!(page.contains("action=\"/run/1/search/search\""), "a search box on a trained run's page: {page}");
    let title = item["text"].as_str().unwrap();
    let cli = sb.run(&["search", "1", "--text", title, "-f", "csv"]).expect(0).stdout();
    let cli_ids: Vec<String> = cli.lines().skip(1).map(|l| l.split(',').nth(1).unwrap().to_string()).collect();
    let (status, html) = get(&addr, &format!("/run/1/search/search?q={}&modality=image", common::enc(title)));
    assert_eq!(status, 200, "{html}");
    assert_eq!(tile_ids(&html), cli_ids, "the app's search answers as the command does, in order");
    // Its links stay under the run's address: item pages and thumbnails.
    assert!(html.contains("href=\"/run/1/search/item/0/"), "{html}");
    let img = html.split("src=\"").nth(1).and_then(|s| s.split('"').next()).unwrap().to_string();
    assert!(img.starts_with("/run/1/search/img/0/"), "{img}");
    let (status, _) = get(&addr, &img);
    assert_eq!(status, 200, "{img}");
    assert_eq!(get(&addr, "/run/1/search/img/0/..%2F..%2Fetc%2Fpasswd").0 / 100, 4);
    assert_eq!(get(&addr, "/run/999/search").0, 404);
    assert_eq!(get(&addr, "/run/x/search").0, 400);
    // The evaluate stage's retrieval gallery, its photos served by item id from the run's dataset.
    assert!(page.contains("retrieval gallery"), "{page}");
    let photo = page.split("src=\"/run/1/photo/").nth(1).and_then(|s| s.split('"').next()).unwrap().to_string();
    let (status, head_and_body) = http(
        &addr,
        format!("GET /run/1/photo/{photo} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    assert_eq!(status, 200, "{head_and_body}");
    assert_eq!(get(&addr, "/run/1/photo/no-such-item").0, 404);
    assert_eq!(get(&addr, "/run/1/photo/..%2F..%2Fetc%2Fpasswd").0, 404);

    // In Chromium: the gallery's photos load, and the search box answers as the command does.
    let b = common::webdriver::Browser::start(sb.path(), 1300, 1000);
    let wait = std::time::Duration::from_secs(60);
    b.open(&format!("http://{addr}/run/1"));
    b.wait_for(
        "const im = Array.from(document.querySelectorAll('img[src*=\"/photo/\"]')); \
         return im.length > 0 && im.every(i => i.complete)",
        wait,
        "the gallery's photos",
    );
    let broken = b.js("return Array.from(document.querySelectorAll('img[src*=\"/photo/\"]')).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)");
    assert_eq!(broken, serde_json::json!([]), "photos that did not load");
    if let Ok(dir) = std::env::var("HUSE_UI_SHOTS") {
        b.screenshot(&std::path::Path::new(&dir).join("ui-run.png"));
    }
    b.js(&format!(
        "const f = document.querySelector('form[action=\"/run/1/search/search\"]'); f.q.value = {}; f.submit(); return true;",
        serde_json::json!(title)
    ));
    b.wait_for(
        "return location.pathname === '/run/1/search/search' && document.querySelectorAll('.hit').length > 0",
        wait,
        "the results",
    );
    let ids = b.js("return Array.from(document.querySelectorAll('.hit')).map(h => h.dataset.id)");
    assert_eq!(ids, serde_json::json!(cli_ids), "the search box's results are the command's");
    if let Ok(dir) = std::env::var("HUSE_UI_SHOTS") {
        b.screenshot(&std::path::Path::new(&dir).join("ui-search.png"));
    }
}

/// `huse-run serve` gives the same answer as `huse-run search`, in a real browser, and
/// turns away bad requests with a clear 4xx.
fn serve_answers_as_search_does(sb: &Sandbox, item: &serde_json::Value) {
    use std::io::BufRead;
    let mut child = sb
        .cmd(&["serve", "1", "--port", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let _guard = KillOnDrop(child);
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    assert!(addr.starts_with("127.0.0.1:"), "localhost by default: {addr}");

    let title = item["text"].as_str().unwrap();
    // The page shows as many results as the command does by default (10).
    let cli = sb.run(&["search", "1", "--text", title, "-f", "csv"]).expect(0).stdout();
    let cli_ids: Vec<String> = cli.lines().skip(1).map(|l| l.split(',').nth(1).unwrap().to_string()).collect();
    let q: String = title
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect();
    let path = format!("/search?q={q}&modality=image");
    let (status, html) = get(&addr, &path);
    assert_eq!(status, 200, "{html}");
    assert_eq!(tile_ids(&html), cli_ids, "the page shows the CLI's results, in order");
    // Beside the run's name, what to expect of it: its instance R@1 among its headline figures.
    assert!(html.contains("test.inst.t2i.r1 0."), "{html}");

    // In Chromium: the DOM has the same tiles, and the page renders with its thumbnails.
    let chromium = |extra: &[String]| {
        std::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1200,900",
            ])
            .arg(format!("--user-data-dir={}", sb.path().join("chromium").display()))
            .args(extra)
            .arg(format!("http://{addr}{path}"))
            .stderr(std::process::Stdio::null())
            .output()
            .expect("chromium must be installed (Debian package `chromium`; .ci/run installs it)")
    };
    let dom = String::from_utf8_lossy(&chromium(&["--dump-dom".to_string()]).stdout).into_owned();
    assert_eq!(tile_ids(&dom), cli_ids, "the browser's DOM shows the same results");
    assert_eq!(cli_ids.len(), 10);
    // Tiles link to the item's page and image by the id they show.
    assert!(dom.contains(&format!("data-id=\"{}\"", cli_ids[0])), "{dom}");
    assert!(dom.contains(&format!("<a href=\"/item/0/{0}\"><img src=\"/img/0/{0}\"", cli_ids[0])), "{dom}");
    let shot = sb.path().join("serve.png");
    assert!(chromium(&[format!("--screenshot={}", shot.display())]).status.success());
    let img = image::open(&shot).unwrap().to_rgb8();
    let colours: std::collections::BTreeSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    assert!(colours.len() > 200, "the page shows product photos ({} colours)", colours.len());

    // The item page shows neighbours in both modalities.
    let (status, page) = get(&addr, &format!("/item/0/{}", cli_ids[0]));
    assert_eq!(status, 200);
    assert!(
        page.contains("nearest images to its image")
            && page.contains("nearest texts to its text")
            && page.contains(&format!("id {}", cli_ids[0]))
            && tile_ids(&page).len() == 40,
        "{page}"
    );
    // A photo upload works; bad requests get a clear 4xx and nothing else.
    let photo = std::fs::read(item["image"].as_str().unwrap()).unwrap();
    let (status, html) = upload(&addr, "p.jpg", &photo);
    assert_eq!(status, 200, "{html}");
    assert_eq!(tile_ids(&html).len(), 10);
    let (status, body) = upload(&addr, "notes.txt", b"not an image at all");
    assert_eq!(status, 415, "{body}");
    assert!(body.contains("not a JPEG or PNG image"));
    let mut big = vec![0xFFu8, 0xD8, 0xFF];
    big.resize(6 << 20, 0);
    assert_eq!(upload(&addr, "big.jpg", &big).0, 413);
    for bad in ["/img/0/..%2F..%2F..%2Fetc%2Fpasswd", "/img/0/../../etc/passwd", "/item/0/-1", "/img/x/0"] {
        let (status, body) = get(&addr, bad);
        assert!((400..500).contains(&status), "{bad}: {status} {body}");
        assert!(!body.contains("root:"), "{bad} must not leak a file");
    }
    assert_eq!(get(&addr, "/img/0/999999").0, 404);
    assert_eq!(get(&addr, "/item/0/no-such-id").0, 404);
    assert_eq!(get(&addr, "/search?q=").0, 400);
    // A decompression bomb (the report's: a blank 14000 x 14000 PNG, a couple of hundred KB
    // that decode to 196 MB of grey and 588 MB of RGB), four at once: refused from its
    // header, and the server's memory stays small.
    let bomb = blank_png(14000, 14000);
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    let answers: Vec<(u16, String)> = std::thread::scope(|s| {
        let (addr, bomb) = (&addr, &bomb);
        let hs: Vec<_> = (0..4).map(|i| s.spawn(move || upload(addr, &format!("bomb{i}.png"), bomb))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (status, body) in &answers {
        assert_eq!(*status, 422, "{body}");
        assert!(body.contains("limit"), "the answer names the size limit: {body}");
    }
    let peak_kb: u64 = std::fs::read_to_string(format!("/proc/{}/status", _guard.0.id()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap()))
        .unwrap();
    assert!(peak_kb < 2 << 20, "serve peaked at {peak_kb} kB");
}

/// A real `w` x `h` 8-bit grey PNG, all black (it compresses to almost nothing).
fn blank_png(w: u32, h: u32) -> Vec<u8> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(&vec![0u8; (w * h) as usize], w, h, image::ExtendedColorType::L8)
        .unwrap();
    out
}

#[test]
fn a_diverging_loss_stops_the_run_with_a_clear_error() {
    let sb = Sandbox::new();
    let f = experiment(&sb);
    let out = sb.run(&[&f, "--set", "train.optimizer.lr=1e30", "--set", "train.epochs=2"]).expect(1);
    let err = sb.sql("SELECT error FROM runs")[0][0].clone();
    assert!(err.contains("stage `train` failed: the loss became"), "{err}\n{}", out.stderr());
    assert!(err.contains("lower the learning rate"), "{err}");
    assert_eq!(sb.sql("SELECT status FROM stage_runs WHERE stage = 'evaluate'")[0][0], "skipped");
}

#[test]
fn training_on_augmented_views() {
    let sb = Sandbox::new();
    let f = experiment(&sb);
    // Asking train for views the encode stage did not make is a clear error.
    sb.run(&[&f, "--set", "train.augment=true", "--set", "train.epochs=2"]).expect(1);
    let err = sb.sql("SELECT error FROM runs WHERE id = 1")[0][0].clone();
    assert!(
        err.contains("augment: true")
            && err.contains("holds no augmented views: set `views: {count: K, ...}` in the encode stage"),
        "{err}"
    );
    // Two views per training image; train draws one per item per epoch.
    let views =
        "encode.views={count: 2, seed: 3, brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.1, hflip: 0.5}";
    let aug = [f.as_str(), "--set", views, "--set", "train.augment=true", "--set", "train.epochs=3"];
    sb.run(&aug).expect(0);
    assert_eq!(value(&sb, 2, "train.augment_views"), 2.0);
    let ingest = sb.sql("SELECT output_dir FROM stage_runs WHERE run_id = 2 AND stage = 'ingest'")[0][0].clone();
    let n_train = std::fs::read_to_string(format!("{ingest}/items.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"split\":\"train\""))
        .count();
    assert!(n_train > 100, "{n_train} training items");
    assert_eq!(value(&sb, 2, "encode.views"), 2.0 * n_train as f64);
    assert!(value(&sb, 2, "test.acc.both") > 0.0);
    // The same seed gives the same curve with views too.
    let mut again = aug.to_vec();
    again.extend(["--force", "train"]);
    sb.run(&again).expect(0);
    assert_eq!(curve(&sb, 3, "train.loss"), curve(&sb, 2, "train.loss"));
    // Without `augment` the same encode output (cached) trains on the clean features: another curve.
    sb.run(&[&f, "--set", views, "--set", "train.epochs=3"]).expect(0);
    assert_eq!(sb.sql("SELECT cached FROM stage_runs WHERE run_id = 4 AND stage = 'encode'")[0][0], "1");
    assert_ne!(curve(&sb, 4, "train.loss"), curve(&sb, 2, "train.loss"));
}
