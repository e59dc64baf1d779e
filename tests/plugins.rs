//! Stages from outside: dynamic plugins (the example plugin, built here, inside a real
//! experiment, and every way loading or running one can fail) and command stages (any
//! program, here a shell script, in a sweep with seeds, the cache and the database).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Sandbox;

/// Builds the example plugin and returns its shared library.
fn example_plugin() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    // A target directory of its own: the outer `cargo test` holds the lock on the main one.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("example-plugin");
    let out = Command::new(env!("CARGO"))
        .args(["build", "-p", "huse-example-plugin", "--message-format=json-render-diagnostics"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(root)
        .output()
        .unwrap();
    assert!(out.status.success(), "building the example plugin failed:\n{}", String::from_utf8_lossy(&out.stderr));
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        if v["reason"] == "compiler-artifact" && v["target"]["name"] == "huse_example_plugin" {
            for f in v["filenames"].as_array().unwrap() {
                let f = f.as_str().unwrap();
                if f.ends_with(".so") || f.ends_with(".dylib") || f.ends_with(".dll") {
                    return PathBuf::from(f);
                }
            }
        }
    }
    panic!("no library in cargo's output");
}

/// A C shared library (gcc), for plugins that are wrong in ways Rust would not let us write.
fn c_library(sb: &Sandbox, name: &str, source: &str) -> PathBuf {
    let c = sb.write(&format!("{name}.c"), source);
    let so = sb.path().join(format!("{name}.so"));
    let st = Command::new("cc").args(["-shared", "-fPIC", "-o"]).arg(&so).arg(&c).status().unwrap();
    assert!(st.success());
    so
}

fn experiment(sb: &Sandbox, plugin: &Path, graph_with: &str) -> PathBuf {
    let assets = std::env::var("HUSE_ASSETS").expect("set HUSE_ASSETS");
    sb.write(
        "p.yaml",
        &format!(
            "name: plug\nplugins: [{}]\nstages:\n  ingest:\n    uses: ingest\n    with:\n      root: {assets}/data/fashion-product-images-small\n      \
             classes: [masterCategory, subCategory, articleType]\n      limit: 400\n      check_images: exists\n  \
             graph: {{ uses: graph-flat, needs: [ingest], with: {graph_with} }}\n  after: {{ uses: graph-tree, needs: [ingest, graph] }}\n",
            plugin.display()
        ),
    )
}

#[test]
fn the_example_plugin_runs_in_an_experiment_and_is_recorded() {
    let lib = example_plugin();
    let sb = Sandbox::new();
    let listed = sb.run(&["list", "--plugin", lib.to_str().unwrap()]).expect(0).stdout();
    assert!(listed.contains("graph-flat") && listed.contains("plugin:"), "{listed}");
    let f = experiment(&sb, &lib, "{ distance: 0.8 }");
    sb.run(&[f.to_str().unwrap()]).expect(0);
    let row = &sb.sql("SELECT source, cache_key, output_dir, cached FROM stage_runs WHERE stage = 'graph'")[0];
    assert!(row[0].starts_with("plugin:") && row[0].ends_with("libhuse_example_plugin.so@0.2.0"), "{}", row[0]);
    assert_eq!(row[3], "0");
    // Its output is a real graph: K x K with 0.8 off the diagonal.
    let a = candle_core::safetensors::load(Path::new(&row[2]).join("graph.safetensors"), &candle_core::Device::Cpu)
        .unwrap();
    let a: Vec<Vec<f32>> = a["A"].to_vec2().unwrap();
    let k = sb.count("SELECT CAST(value AS INTEGER) FROM final_metrics WHERE key = 'graph.classes'") as usize;
    assert_eq!(a.len(), k);
    assert!(a[0][0] == 0.0 && a[0][1] == 0.8);
    // The host's thread budget crosses the ABI: the plugin ran in a pool of that size.
    let threads =
        sb.count("SELECT CAST(value AS INTEGER) FROM final_metrics WHERE run_id = 1 AND key = 'plugin.threads'");
    assert!(threads >= 1 && threads as usize <= std::thread::available_parallelism().unwrap().get());
    assert_eq!(
        sb.count("SELECT CAST(value AS INTEGER) FROM final_metrics WHERE run_id = 1 AND key = 'plugin.pool'"),
        threads
    );
    sb.run(&[f.to_str().unwrap(), "--threads-per-job", "3", "--force", "graph"]).expect(0);
    assert_eq!(
        sb.count("SELECT CAST(value AS INTEGER) FROM final_metrics WHERE run_id = 2 AND key = 'plugin.pool'"),
        3
    );
    // Cached on the second run, under the same key.
    sb.run(&[f.to_str().unwrap()]).expect(0);
    let again = &sb.sql("SELECT cache_key, cached FROM stage_runs WHERE stage = 'graph' AND run_id = 3")[0];
    assert_eq!((again[0].as_str(), again[1].as_str()), (row[1].as_str(), "1"));
}

#[test]
fn plugin_failures_are_clear_and_leave_the_database_consistent() {
    let lib = example_plugin();
    let sb = Sandbox::new();
    // Loading failures: refused before anything runs, positioned at the list entry.
    let text = sb.write("notalib.so", "just text");
    let no_entry = c_library(&sb, "noentry", "int something(void) { return 1; }\n");
    let bad_abi = c_library(
        &sb,
        "badabi",
        "struct T { unsigned abi; const char *v; unsigned long n; const void *s; void *f; };\n\
         static struct T t = { 999, \"9.9\", 0, 0, 0 };\nconst struct T *huse_plugin_entry(void) { return &t; }\n",
    );
    // A library whose own dependency is missing: the loader's message names it.
    let dep = c_library(&sb, "libhusedep", "int dep(void) { return 1; }\n");
    let needs_c = sb.write("needsdep.c", "int dep(void);\nint f(void) { return dep(); }\n");
    let needs_dep = sb.path().join("needsdep.so");
    let st = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&needs_dep)
        .arg(&needs_c)
        .arg(format!("-L{}", sb.path().display()))
        .arg("-lhusedep")
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::remove_file(&dep).unwrap();
    for (lib_path, expected) in [
        (needs_dep, "libhusedep.so: cannot open shared object file"),
        (text.clone(), "is not a loadable shared library"),
        (no_entry, "has no `huse_plugin_entry` symbol"),
        (bad_abi, "was built for plugin ABI version 999, this huse-run speaks version 2"),
        (sb.path().join("missing.so"), "does not exist"),
    ] {
        let f = experiment(&sb, &lib_path, "{}");
        let out = sb.run(&[f.to_str().unwrap()]).expect(2);
        assert!(
            out.stderr().contains(expected) && out.stderr().contains("p.yaml:2:11: plugins.0:"),
            "{expected}: {}",
            out.stderr()
        );
        assert!(!sb.db().exists(), "nothing may be written");
        // The same through --plugin.
        let out = sb.run(&["validate", f.to_str().unwrap(), "--plugin", lib_path.to_str().unwrap()]).expect(2);
        assert!(
            out.stderr().contains(&format!("(command line `--plugin {}`)", lib_path.display())),
            "{}",
            out.stderr()
        );
    }
    // A plugin stage's own config errors are positioned like a built-in's.
    let f = experiment(&sb, &lib, "{ distance: 5 }");
    let out = sb.run(&[f.to_str().unwrap()]).expect(2);
    assert!(out.stderr().contains("stages.graph.with.distance: must be in [0, 2]"), "{}", out.stderr());
    // Run-time failures: an error and a panic inside the plugin fail the stage, not the process.
    for (mode, expected) in
        [("error", "graph-flat failed on purpose"), ("panic", "plugin panicked: graph-flat panicked on purpose")]
    {
        let f = experiment(&sb, &lib, &format!("{{ fail: {mode} }}"));
        let out = sb.run(&[f.to_str().unwrap()]).expect(1);
        let run = sb.count("SELECT max(id) FROM runs");
        let r = &sb.sql(&format!("SELECT status, error FROM runs WHERE id = {run}"))[0];
        assert_eq!(r[0], "failed", "{}", out.stderr());
        assert!(r[1].contains(expected), "{mode}: {}", r[1]);
        assert_eq!(
            sb.sql(&format!("SELECT status FROM stage_runs WHERE run_id = {run} AND stage = 'after'"))[0][0],
            "skipped"
        );
    }
    assert_eq!(sb.count("SELECT count(*) FROM runs WHERE status = 'running'"), 0);
    assert_eq!(std::fs::read_dir(sb.cache().join(".tmp")).unwrap().count(), 0);
}

#[test]
fn a_sweep_swaps_implementations_of_one_role() {
    let lib = example_plugin();
    let sb = Sandbox::new();
    let f = experiment(&sb, &lib, "{}");
    let yaml = std::fs::read_to_string(&f).unwrap() + "sweep:\n  graph.uses: [graph-flat, graph-tree]\n";
    std::fs::write(&f, yaml).unwrap();
    sb.run(&[f.to_str().unwrap()]).expect(0);
    let rows = sb.sql("SELECT p.value, s.kind, s.source FROM runs r JOIN params p ON p.run_id = r.id AND p.key = 'graph.uses' JOIN stage_runs s ON s.run_id = r.id AND s.stage = 'graph' ORDER BY r.id");
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0][0].as_str(), rows[0][1].as_str()), ("graph-flat", "graph-flat"));
    assert!(rows[0][2].starts_with("plugin:"));
    assert_eq!(
        (rows[1][0].as_str(), rows[1][1].as_str(), rows[1][2].as_str()),
        ("graph-tree", "graph-tree", "builtin")
    );
    // The shared ingest ran once.
    assert_eq!(sb.count("SELECT count(*) FROM stage_runs WHERE stage = 'ingest' AND cached = 0"), 1);
}

/// A shell script stage: doubles its input numbers by `k`, logs three loss steps and a final score.
const SCRIPT: &str = r#"set -e
k="$1"
sum=$(tr -d '[] ' < "$HUSE_INPUT_NUMBERS_JSON" | tr ',' '\n' | awk '{s += $1} END {print s}')
echo $((sum * k)) > "$HUSE_OUT_DIR/scaled.txt"
for step in 1 2 3; do
  echo "{\"step\": $step, \"total\": 3, \"loss\": $((k * HUSE_SEED * 10 / step))}" >> "$HUSE_METRICS"
done
echo "{\"final\": {\"score\": $((k * 100 + HUSE_SEED))}}" >> "$HUSE_METRICS"
echo "ran k=$k seed=$HUSE_SEED threads=$OMP_NUM_THREADS" >&2
"#;

fn command_experiment(sb: &Sandbox, extra: &str) -> PathBuf {
    sb.write("stage.sh", SCRIPT);
    sb.write(
        "cmd.yaml",
        &format!(
            "name: cmd\nrepeat: 2\nsweep: {{ cmd.params.k: [2, 3] }}\nstages:\n  source: {{ uses: toy-source, with: {{ count: 4 }} }}\n  \
             cmd:\n    uses: command\n    needs: [source]\n    with:\n      run: [sh, stage.sh, \"${{params.k}}\"]\n      \
             inputs: [numbers.json]\n      outputs: [scaled.txt]\n      files: [stage.sh]\n      params: {{ k: 1 }}\n{extra}"
        ),
    )
}

#[test]
fn a_command_stage_sweeps_with_seeds_is_cached_and_reruns_when_its_script_changes() {
    let sb = Sandbox::new();
    let f = command_experiment(&sb, "");
    let f = f.to_str().unwrap();
    sb.run(&["validate", f]).expect(0);
    sb.run(&[f]).expect(0);
    // 2 values of k x 2 seeds: four runs, each with its params, history and final metric.
    assert_eq!(sb.count("SELECT count(*) FROM runs WHERE status = 'succeeded'"), 4);
    assert_eq!(sb.count("SELECT count(*) FROM params WHERE key = 'cmd.params.k'"), 4);
    assert_eq!(sb.count("SELECT count(*) FROM metrics WHERE stage = 'cmd' AND key = 'loss'"), 4 * 3);
    let rows = sb.sql(
        "SELECT p.value, r.seed, m.value FROM metrics m JOIN runs r ON r.id = m.run_id \
         JOIN params p ON p.run_id = r.id AND p.key = 'cmd.params.k' WHERE m.key = 'score' ORDER BY r.id",
    );
    assert_eq!(rows.len(), 4, "{rows:?}");
    for r in &rows {
        let (k, seed): (i64, i64) = (r[0].parse().unwrap(), r[1].parse().unwrap());
        assert_eq!(r[2].parse::<f64>().unwrap(), (k * 100 + seed) as f64, "{rows:?}");
    }
    let loss = sb.sql("SELECT value FROM metrics WHERE run_id = 1 AND key = 'loss' ORDER BY step");
    assert_eq!(loss.len(), 3);
    // The sum of the source's 4 numbers, times k, is the output.
    let path = |stage: &str, name: &str| {
        sb.sql(&format!("SELECT path FROM artifacts WHERE run_id = 1 AND stage = '{stage}' AND name = '{name}'"))[0][0]
            .clone()
    };
    let numbers: Vec<f64> =
        serde_json::from_str(&std::fs::read_to_string(path("source", "numbers.json")).unwrap()).unwrap();
    let scaled: f64 = std::fs::read_to_string(path("cmd", "scaled.txt")).unwrap().trim().parse().unwrap();
    let k: f64 = sb.sql("SELECT value FROM params WHERE run_id = 1 AND key = 'cmd.params.k'")[0][0].parse().unwrap();
    assert_eq!(scaled, k * numbers.iter().sum::<f64>());
    // A rerun is all cache hits (the metrics replayed); a changed script runs again.
    sb.run(&[f]).expect(0);
    assert_eq!(sb.count("SELECT count(*) FROM stage_runs WHERE run_id > 4 AND stage = 'cmd' AND cached = 1"), 4);
    assert_eq!(sb.count("SELECT count(*) FROM metrics WHERE run_id > 4 AND key = 'score'"), 4);
    sb.write("stage.sh", &format!("{SCRIPT}# changed\n"));
    let o = sb.run(&[f]).expect(0);
    assert_eq!(
        sb.count("SELECT count(*) FROM stage_runs WHERE run_id > 8 AND stage = 'cmd' AND cached = 0"),
        4,
        "{}",
        o.stderr()
    );
    assert_eq!(sb.count("SELECT count(*) FROM stage_runs WHERE run_id > 8 AND stage = 'source' AND cached = 1"), 4);
}

#[test]
fn a_failing_command_shows_its_stderr_and_leaves_nothing_in_the_cache() {
    let sb = Sandbox::new();
    let f = command_experiment(&sb, "");
    sb.write("stage.sh", "echo 'Traceback: no module named torch' >&2\nexit 4\n");
    let err = sb.run(&[f.to_str().unwrap()]).expect(1).stderr();
    assert!(err.contains("exited with status 4") && err.contains("no module named torch"), "{err}");
    let e = sb.sql("SELECT error FROM stage_runs WHERE stage = 'cmd' LIMIT 1");
    assert!(e[0][0].contains("no module named torch"), "{e:?}");
    assert!(!sb.cache().join("command").exists(), "nothing half-written enters the cache");
    // Bad wiring is a config error before anything runs, at the key.
    let bad = sb.write(
        "bad.yaml",
        "name: bad\nstages:\n  source: { uses: toy-source }\n  cmd:\n    uses: command\n    needs: [source]\n    with:\n      run: [sh, -c, \"echo ${params.n}\"]\n",
    );
    let err = sb.run(&["validate", bad.to_str().unwrap()]).expect(2).stderr();
    assert!(err.contains("bad.yaml:8") && err.contains("`params` does not have"), "{err}");
    let bad = sb.write(
        "bad2.yaml",
        "name: bad\nstages:\n  source: { uses: toy-source }\n  cmd:\n    uses: command\n    needs: [source]\n    with: { run: [sh], inputs: [nothing.bin] }\n",
    );
    let err = sb.run(&["validate", bad.to_str().unwrap()]).expect(2).stderr();
    assert!(err.contains("takes artifact `nothing.bin`"), "{err}");
}

#[test]
fn ctrl_c_stops_a_command_and_everything_it_started() {
    let sb = Sandbox::new();
    // The program starts a grandchild, and both write their PIDs, then wait.
    let f = command_experiment(&sb, "");
    sb.write(
        "stage.sh",
        "sleep 300 &\necho $! > \"$HUSE_WORK_DIR/../grandchild.pid\"\necho $$ > \"$HUSE_WORK_DIR/../child.pid\"\nwait\n",
    );
    let child = sb.cmd(&[f.to_str().unwrap()]).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let t0 = std::time::Instant::now();
    let pid_file = |n: &str| -> Option<String> {
        walk(&sb.cache())
            .into_iter()
            .find(|p| p.file_name().is_some_and(|f| f == n))
            .and_then(|p| std::fs::read_to_string(p).ok().filter(|s| s.ends_with('\n')).map(|s| s.trim().to_string()))
    };
    let (pid, grand) = loop {
        if let (Some(a), Some(b)) = (pid_file("child.pid"), pid_file("grandchild.pid")) {
            break (a, b);
        }
        assert!(t0.elapsed().as_secs() < 30, "the command never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    // Running: a process that ended but whose new parent has not reaped it yet is a zombie.
    let alive = |p: &str| {
        std::fs::read_to_string(format!("/proc/{p}/status"))
            .is_ok_and(|s| !s.lines().any(|l| l.starts_with("State:") && l.contains('Z')))
    };
    assert!(alive(&pid) && alive(&grand));
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!alive(&pid), "the program {pid} is still running");
    assert!(!alive(&grand), "what it started ({grand}) is still running");
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() { stack.push(p) } else { out.push(p) }
        }
    }
    out
}
