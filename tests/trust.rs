//! Results you can trust: one regression test per fault or bad input that once lost data,
//! corrupted results or was accepted silently (each named after its case), run against the
//! real `huse-run` binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Sandbox;

/// source (4 numbers) -> mid (sleeps, logs 5 loss steps and a mean) -> total (a sum): 7 metrics.
fn chain(seconds: f64, steps: u32) -> String {
    format!(
        "name: c\nstages:\n  source: {{ uses: toy-source, with: {{ count: 4 }} }}\n  \
         mid: {{ uses: toy-scale, needs: [source], with: {{ seconds: {seconds}, metrics: {steps} }} }}\n  \
         total: {{ uses: toy-sum, needs: [mid] }}\n"
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn spool_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}

#[test]
fn metric_rows_are_never_dropped_when_the_database_stays_busy() {
    let sb = Sandbox::new();
    let (_, err) = spool_a_busy_run(&sb);
    assert!(err.contains("huse-run db replay") && err.contains(".spool"), "{err}");
    // A query says what is missing, without writing anything.
    assert!(sb.run(&["runs"]).expect(0).stderr().contains("spooled and not yet in"));
    // The next start writes everything, exactly once.
    sb.run(&["db", "replay"]).expect(0);
    sb.run(&["db", "replay"]).expect(0);
    assert_eq!(sb.sql("SELECT status FROM runs")[0][0], "succeeded");
    assert_eq!(sb.count("SELECT count(*) FROM metrics"), 7);
    assert_eq!(sb.count("SELECT count(DISTINCT key) FROM metrics"), 3);
    assert_eq!(sb.count("SELECT count(*) FROM stage_runs"), 3);
    assert!(spool_files(&sb.path().join("results.sqlite.spool")).is_empty(), "the replayed spool is removed");
}

/// A small tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Fills the disk with 16 KiB files, then frees the first `free` of them: a disk with
    /// a little room.
    fn fill_leaving(&self, free: usize) {
        let mut chunk = 0;
        while std::fs::write(self.0.join(format!("filler{chunk}")), vec![1u8; 16 << 10]).is_ok() {
            chunk += 1;
        }
        for i in 0..chunk.min(free) {
            std::fs::remove_file(self.0.join(format!("filler{i}"))).unwrap();
        }
    }

    /// A tmpfs for test `test`; None, saying why on stderr, where mounting is not allowed (CI
    /// runs as root and can mount; elsewhere the test says it did not run instead of passing
    /// silently).
    fn for_test(dir: &Path, size: &str, test: &str) -> Option<Tmpfs> {
        Tmpfs::mount(dir, size).map_err(|e| eprintln!("NOT RUN: {test} needs to mount a tmpfs: {e}")).ok()
    }

    /// Room again: removes every filler file.
    fn empty(&self) {
        for e in std::fs::read_dir(&self.0).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("filler") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(Tmpfs(dir.to_path_buf()))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_while_writing_the_database_rolls_back_and_keeps_the_rows() {
    let sb = Sandbox::new();
    let Some(fs) = Tmpfs::for_test(
        &sb.path().join("small"),
        "2m",
        "a_full_disk_while_writing_the_database_rolls_back_and_keeps_the_rows",
    ) else {
        return;
    };
    let db = fs.0.join("r.sqlite");
    let run = |args: &[&str]| sb.cmd(args).env("HUSE_DB", &db).env("HUSE_DB_RETRY", "1").output().unwrap();
    // A first run creates the database; then a filler takes all but a little of the disk.
    let tiny = sb.write("t.yaml", "name: t\nstages:\n  s: { uses: toy-source }\n");
    assert!(run(&[tiny.to_str().unwrap()]).status.success());
    fs.fill_leaving(12);
    let f = sb.write("c.yaml", &chain(0.0, 20000));
    let out = common::Out(run(&[f.to_str().unwrap()]));
    let err = out.stderr();
    assert_eq!(out.code(), 1, "{err}");
    assert!(!err.contains("non-zero transaction depth"), "a failed transaction must be rolled back:\n{err}");
    assert!(err.contains("full"), "the cause is named:\n{err}");
    // Beside the full database nothing could be written: the rows went to the cache's spool.
    let spool = spool_files(&sb.cache().join(".spool"));
    assert_eq!(spool.len(), 1, "{err}");
    let listed = String::from_utf8_lossy(&run(&["runs", "-f", "csv"]).stdout).into_owned();
    assert!(
        listed.lines().any(|l| l.starts_with("2,c,c,failed,")),
        "the run is marked failed, not left running:\n{listed}\n{err}"
    );
    let shown = String::from_utf8_lossy(&run(&["show", "2"]).stdout).into_owned();
    assert!(shown.contains("results incomplete"), "{shown}");
    // Room again: the next start writes the spooled rows and the run's real status.
    fs.empty();
    let o = run(&["db", "replay"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = run(&["export", "-e", "c"]);
    let csv = String::from_utf8_lossy(&rows.stdout);
    assert_eq!(csv.lines().filter(|l| l.contains(",metric,loss,")).count(), 20000, "every loss step, once");
    assert!(csv.lines().any(|l| l.contains(",succeeded,metric,sum,")), "the run is complete and succeeded");
    assert!(spool_files(&sb.cache().join(".spool")).is_empty());
    assert!(db.with_extension("reserve").exists(), "and kept again once there is room");
}

#[test]
fn a_disk_full_to_the_last_byte_still_lets_the_run_be_marked_failed() {
    let sb = Sandbox::new();
    let Some(fs) = Tmpfs::for_test(
        &sb.path().join("small"),
        "2m",
        "a_disk_full_to_the_last_byte_still_lets_the_run_be_marked_failed",
    ) else {
        return;
    };
    let db = fs.0.join("r.sqlite");
    rt().block_on(async {
        use huse_store::{Location, Options, Run, Store};
        let store = Store::open(&Location::Sqlite(db.clone()), Options::default()).await.unwrap();
        let exp = store.experiment("e", "e.yaml").await.unwrap();
        let id = store.insert_run(exp, &Run::starting("e", "r", "", 1, "cpu"), "", &[]).await.unwrap();
        // Not a byte left: 16 KiB files, then 1 KiB ones, then single bytes.
        for size in [16 << 10, 1 << 10, 1] {
            let mut i = 0;
            while std::fs::write(fs.0.join(format!("filler-{size}-{i}")), vec![1u8; size]).is_ok() {
                i += 1;
            }
        }
        store.mark_incomplete(&[id], "the disk is full").await.expect("marked failed on a full disk");
        assert!(!db.with_extension("reserve").exists(), "the reserve was given up for that");
        assert_eq!(store.run(id).await.unwrap().run.status, huse_store::RunStatus::Failed);
    });
}

/// The output directory of `stage` in run `run`.
fn out_dir(sb: &Sandbox, run: i64, stage: &str) -> PathBuf {
    PathBuf::from(
        &sb.sql(&format!("SELECT output_dir FROM stage_runs WHERE run_id = {run} AND stage = '{stage}'"))[0][0],
    )
}

#[test]
fn a_repaired_upstream_never_leaves_downstream_entries_computed_from_bad_content() {
    let sb = Sandbox::new();
    let f = sb.write("c.yaml", &chain(0.0, 0));
    let f = f.to_str().unwrap();
    sb.run(&[f]).expect(0);
    let good_total = out_dir(&sb, 1, "total");
    // Hand-edit the upstream output, keeping its size (no size check can see it).
    let numbers = out_dir(&sb, 1, "source").join("numbers.json");
    let text = std::fs::read_to_string(&numbers).unwrap();
    std::fs::write(&numbers, text.replace('3', "9")).unwrap();
    std::fs::remove_dir_all(out_dir(&sb, 1, "mid")).unwrap();
    // mid must be recomputed, and refuses to compute from damaged input.
    let out = sb.run(&[f]).expect(1);
    assert!(
        out.stderr().contains("input `numbers.json` from stage `source` does not match its recorded hash"),
        "{}",
        out.stderr()
    );
    assert!(out.stdout().contains("no longer matches the hash recorded when it was written"), "{}", out.stdout());
    // Repaired with --force: downstream keys follow the content, so the good entries are found again.
    sb.run(&[f, "--force", "source"]).expect(0);
    assert_eq!(out_dir(&sb, 3, "total"), good_total);
    assert_eq!(sb.sql("SELECT value FROM final_metrics WHERE run_id = 3 AND key = 'sum'")[0][0], "6");
    // The manifest records the inputs by content.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(good_total.join(".huse-stage.json")).unwrap()).unwrap();
    assert_eq!(manifest["schema"], 2);
    assert_eq!(manifest["inputs"][0][0], "mid/scaled.json");
    assert_eq!(manifest["inputs"][0][1].as_str().unwrap().len(), 64);
}

#[test]
fn damaged_cache_entries_are_recomputed_not_trusted() {
    let sb = Sandbox::new();
    let f = sb.write("c.yaml", &chain(0.0, 2));
    let f = f.to_str().unwrap();
    sb.run(&[f]).expect(0);
    let mid = out_dir(&sb, 1, "mid");
    type Hurt = Box<dyn Fn(&Path)>;
    let damage: Vec<(&str, Hurt)> = vec![
        ("a deleted output", Box::new(|d: &Path| std::fs::remove_file(d.join("scaled.json")).unwrap())),
        ("a truncated output", Box::new(|d: &Path| std::fs::write(d.join("scaled.json"), "[1,").unwrap())),
        (
            "an emptied entry",
            Box::new(|d: &Path| {
                for e in std::fs::read_dir(d).unwrap() {
                    std::fs::remove_file(e.unwrap().path()).unwrap();
                }
            }),
        ),
        ("a missing metrics file", Box::new(|d: &Path| std::fs::remove_file(d.join(".huse-metrics.jsonl")).unwrap())),
    ];
    for (i, (what, hurt)) in damage.iter().enumerate() {
        hurt(&mid);
        let out = sb.run(&[f]).expect(0);
        assert!(
            out.stderr().contains("is damaged") && out.stderr().contains("recomputing"),
            "{what}: {}",
            out.stderr()
        );
        let run = 2 + i as i64;
        assert_eq!(
            sb.sql(&format!("SELECT cached FROM stage_runs WHERE run_id = {run} AND stage = 'mid'"))[0][0],
            "0",
            "{what}"
        );
        assert_eq!(
            sb.count(&format!("SELECT count(*) FROM metrics WHERE run_id = {run} AND stage = 'mid'")),
            3,
            "{what}: no metric lost"
        );
    }
    // A same-size edit passes the size check; --verify and `cache verify` hash the content.
    let scaled = mid.join("scaled.json");
    let text = std::fs::read_to_string(&scaled).unwrap();
    std::fs::write(&scaled, text.replacen('1', "7", 1)).unwrap();
    assert!(sb.run(&[f]).expect(0).stderr().contains("cache hit"));
    let out = sb.run(&[f, "--verify"]).expect(0);
    assert!(out.stderr().contains("does not match its recorded hash"), "{}", out.stderr());
    std::fs::write(&scaled, std::fs::read_to_string(&scaled).unwrap().replacen('1', "7", 1)).unwrap();
    let out = sb.run(&["cache", "verify"]).expect(1);
    assert!(
        out.stdout().contains("does not match its recorded hash; removed")
            && out.stdout().contains("1 damaged and removed"),
        "{}",
        out.stdout()
    );
    assert!(sb.run(&["cache", "verify"]).expect(0).stdout().contains("0 damaged"));
}

#[test]
fn the_same_metric_key_from_two_stages_stays_apart() {
    let sb = Sandbox::new();
    let f = sb.write(
        "m.yaml",
        "name: m\nstages:\n  source: { uses: toy-source, with: { count: 4 } }\n  \
         left: { uses: toy-scale, needs: [source], with: { factor: 1.0 } }\n  \
         right: { uses: toy-scale, needs: [source], with: { factor: 100.0 } }\n\
         repeat: 2\n",
    );
    sb.run(&[f.to_str().unwrap()]).expect(0);
    // left.mean = 1.5, right.mean = 150 in every run: never mixed, never averaged together.
    let runs = sb.run(&["runs", "-f", "csv", "-m", "*mean"]).expect(0).stdout();
    assert!(runs.starts_with("id,experiment,name,status,seed,left.mean,right.mean\n"), "{runs}");
    assert!(runs.lines().skip(1).all(|l| l.ends_with(",1.5,150")), "{runs}");
    let grouped = sb.run(&["runs", "--group", "-f", "csv", "-m", "*mean"]).expect(0).stdout();
    assert!(grouped.contains(",2,1.5,0,150,0"), "{grouped}");
    let best = sb.run(&["best", "-m", "right.mean", "-f", "csv"]).expect(0).stdout();
    assert!(best.contains(",150"), "{best}");
    assert_eq!(sb.run(&["runs", "-w", "left.mean<2", "-f", "csv"]).expect(0).stdout().lines().count(), 3);
    let err = sb.run(&["runs", "-w", "mean<2"]).expect(1).stderr();
    assert!(err.contains("metric `mean` is logged by several stages") && err.contains("left, right"), "{err}");
    let export = sb.run(&["export", "-f", "csv"]).expect(0).stdout();
    assert!(export.contains(",metric,left.mean,0,1.5") && export.contains(",metric,right.mean,0,150"), "{export}");
}

#[test]
fn stale_temp_cleanup_never_follows_a_tmp_symlink() {
    let sb = Sandbox::new();
    let precious = sb.path().join("precious");
    std::fs::create_dir_all(precious.join("c-999999999-0")).unwrap();
    std::fs::write(precious.join("c-999999999-0/keep.txt"), "mine").unwrap();
    std::fs::create_dir_all(sb.cache()).unwrap();
    std::os::unix::fs::symlink(&precious, sb.cache().join(".tmp")).unwrap();
    let f = sb.write("c.yaml", &chain(0.0, 0));
    let err = sb.run(&[f.to_str().unwrap()]).expect(1).stderr();
    assert!(err.contains("`.tmp` is a symbolic link to") && err.contains("outside the cache"), "{err}");
    assert!(precious.join("c-999999999-0/keep.txt").exists(), "nothing outside the cache is touched");
    // A link inside the temp folder is removed itself, never followed.
    std::fs::remove_file(sb.cache().join(".tmp")).unwrap();
    std::fs::create_dir_all(sb.cache().join(".tmp")).unwrap();
    let dead = format!(".tmp/x-999999999-0@{}", huse_exec::cache::host_tag());
    std::os::unix::fs::symlink(&precious, sb.cache().join(&dead)).unwrap();
    sb.run(&[f.to_str().unwrap()]).expect(0);
    assert!(!sb.cache().join(&dead).exists());
    assert!(precious.join("c-999999999-0/keep.txt").exists());
}

#[test]
fn a_bad_export_leaves_an_existing_file_alone() {
    let sb = common::known_runs();
    let keep = sb.write("keep.csv", "precious\n");
    let err = sb.run(&["export", "-f", "xml", "--out", keep.to_str().unwrap()]).expect(2).stderr();
    assert!(err.contains("unknown export format `xml`"), "{err}");
    assert_eq!(std::fs::read_to_string(&keep).unwrap(), "precious\n");
    sb.run(&["export", "-f", "csv", "--out", keep.to_str().unwrap()]).expect(0);
    assert!(std::fs::read_to_string(&keep).unwrap().starts_with("run_id,experiment,"));
    assert_eq!(
        std::fs::read_dir(sb.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .count(),
        0
    );
}

#[test]
fn set_keys_and_force_stages_that_match_nothing_are_errors() {
    let sb = Sandbox::new();
    let f = sb.write("c.yaml", &chain(0.0, 0));
    let f = f.to_str().unwrap();
    for (args, want) in [
        (
            vec!["--set", "mdi.factor=7"],
            "--set key `mdi.factor` names no stage or settable top-level key; did you mean `mid`?",
        ),
        (vec!["--set", "sed=7"], "did you mean `seed`?"),
        (vec!["--set", "name=other"], "--set key `name` names no stage"),
        (
            vec!["--force", "nosuchstage"],
            "(command line `--force nosuchstage`): no stage `nosuchstage` in this experiment",
        ),
    ] {
        let mut a = vec![f];
        a.extend(args);
        let err = sb.run(&a).expect(2).stderr();
        assert!(err.contains(want), "{a:?}: {err}");
    }
    assert!(!sb.db().exists() && !sb.cache().exists());
}

#[test]
fn db_arguments_are_paths_unless_a_known_url() {
    let sb = Sandbox::new();
    let f = sb.write("c.yaml", &chain(0.0, 0));
    let f = f.to_str().unwrap();
    sb.run(&["--db", "x?mode=rwc", f]).expect(0);
    assert!(
        sb.path().join("x?mode=rwc").is_file() && !sb.path().join("x").exists(),
        "a plain argument is a file name, verbatim"
    );
    sb.run(&["--db", "a%41.sqlite", f]).expect(0);
    assert!(sb.path().join("a%41.sqlite").is_file(), "no percent-decoding of paths");
    sb.run(&["--db", "sqlite://explicit.sqlite", f]).expect(0);
    assert!(sb.path().join("explicit.sqlite").is_file());
    let err = sb.run(&["--db", "mysql://host/db", f]).expect(2).stderr();
    assert!(err.contains("unknown database scheme `mysql://`"), "{err}");
}

#[test]
fn integers_out_of_range_are_errors_not_wraps_or_panics() {
    let sb = Sandbox::new();
    let f = sb.write("r.yaml", &format!("{}repeat: 4294967296\n", chain(0.0, 0)));
    for cmd in [vec!["validate", f.to_str().unwrap()], vec![f.to_str().unwrap()]] {
        let err = sb.run(&cmd).expect(2).stderr();
        assert!(err.contains("repeat: expected an integer from 1 to 10000, found 4294967296"), "{err}");
    }
    let f = sb.write("c.yaml", &chain(0.0, 0));
    let err = sb.run(&[f.to_str().unwrap(), "--jobs", "18446744073709551615"]).expect(2).stderr();
    assert!(err.contains("--jobs"), "{err}");
    let f = sb.write("s.yaml", &format!("{}seed: 9223372036854775807\nrepeat: 3\n", chain(0.0, 0)));
    let err = sb.run(&[f.to_str().unwrap()]).expect(2).stderr();
    assert!(err.contains("gives seeds above 9223372036854775807"), "{err}");
    assert!(!sb.db().exists(), "nothing was recorded");
}

#[test]
fn a_huge_sweep_is_refused_before_it_is_expanded() {
    let sb = Sandbox::new();
    let values = (0..1000).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    let f =
        sb.write("h.yaml", &format!("{}sweep:\n  mid.factor: [{values}]\n  mid.offset: [{values}]\n", chain(0.0, 0)));
    let t0 = Instant::now();
    let err = sb.run(&["validate", f.to_str().unwrap()]).expect(2).stderr();
    assert!(
        err.contains("the sweep makes 1000000 runs, more than the limit of 100000 (raise it with --max-runs)"),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(20));
    let small = sb.write("s.yaml", &format!("{}sweep:\n  mid.factor: [1, 2, 3]\n", chain(0.0, 0)));
    assert!(
        sb.run(&["validate", small.to_str().unwrap(), "--max-runs", "2"]).expect(2).stderr().contains("makes 3 runs")
    );
}

#[test]
fn malformed_where_conditions_are_rejected() {
    let sb = common::known_runs();
    for bad in ["mid.factor<=>1", "mid.factor=", "sum<>3"] {
        let err = sb.run(&["runs", "-w", bad]).expect(2).stderr();
        assert!(err.contains(bad), "{bad}: {err}");
    }
}

#[test]
fn queries_never_write_the_database() {
    let sb = Sandbox::new();
    std::fs::write(sb.db(), "").unwrap();
    let err = sb.run(&["runs"]).expect(1).stderr();
    assert!(err.contains("is not a huse-run database"), "{err}");
    assert_eq!(std::fs::metadata(sb.db()).unwrap().len(), 0, "the empty file stays empty");
    std::fs::write(sb.db(), "not sqlite at all, just text that is long enough to be a header").unwrap();
    assert!(sb.run(&["runs"]).expect(1).stderr().contains("is not a huse-run database"));

    // A real database made read-only still answers queries.
    let sb = common::known_runs();
    let before = std::fs::read(sb.db()).unwrap();
    let mut perm = std::fs::metadata(sb.db()).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o444);
    std::fs::set_permissions(sb.db(), perm).unwrap();
    assert_eq!(sb.run(&["runs", "-f", "csv"]).expect(0).stdout().lines().count(), 5);
    sb.run(&["show", "1"]).expect(0);
    assert_eq!(std::fs::read(sb.db()).unwrap(), before, "not a byte changed");

    // An older schema: queries say how to upgrade, and leave it alone.
    let sb = common::known_runs();
    rt().block_on(async {
        use sqlx::Connection;
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", sb.db().display())).await.unwrap();
        sqlx::query("DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)")
            .execute(&mut c)
            .await
            .unwrap();
    });
    let err = sb.run(&["runs"]).expect(1).stderr();
    assert!(err.contains("has an older schema") && err.contains("to upgrade it"), "{err}");
}

#[test]
fn a_bare_plugin_name_is_resolved_in_the_current_folder_not_the_system_path() {
    let sb = Sandbox::new();
    // A file called like a system library, but not a library at all.
    std::fs::write(sb.path().join("libz.so.1"), "not a shared library").unwrap();
    let err = sb.run(&["list", "--plugin", "libz.so.1"]).expect(2).stderr();
    let here = std::fs::canonicalize(sb.path()).unwrap().join("libz.so.1");
    assert!(
        err.contains(&here.display().to_string()) || err.contains(&sb.path().join("libz.so.1").display().to_string()),
        "{err}"
    );
    assert!(
        err.contains("not a loadable shared library") && !err.contains("huse_plugin_entry"),
        "the system libz must not be loaded: {err}"
    );
}

#[test]
fn quiet_means_quiet_names_are_interpolated_and_outputs_share_permissions() {
    let sb = Sandbox::new();
    let f = sb.write("q.yaml", &chain(6.0, 0).replace("name: c", "name: \"c-${HUSE_TEST_NAME_PART:-x}\""));
    let out = sb.cmd(&["-q", f.to_str().unwrap()]).env("HUSE_TEST_NAME_PART", "v2").output().unwrap();
    let out = common::Out(out).expect(0);
    assert!(!out.stderr().contains("sleep"), "no progress lines with -q:\n{}", out.stderr());
    assert_eq!(sb.sql("SELECT name FROM experiments")[0][0], "c-v2");
    use std::os::unix::fs::PermissionsExt;
    let mut modes = std::collections::BTreeSet::new();
    for stage in ["source", "mid", "total"] {
        for e in std::fs::read_dir(out_dir(&sb, 1, stage)).unwrap() {
            modes.insert(e.unwrap().metadata().unwrap().permissions().mode() & 0o777);
        }
    }
    assert_eq!(modes.len(), 1, "every output file has the same mode: {modes:?}");
}

// ---- Round 3: the metric spool, the shared cache, data, locations, queries. ----

/// Runs `c.yaml` (chain of 7 metrics) while another connection holds the write lock, so
/// every record of the run is spooled beside the database (the invocation fails, saying
/// so); returns the spool file and the run's standard error.
fn spool_a_busy_run(sb: &Sandbox) -> (PathBuf, String) {
    let f = sb.write("c.yaml", &chain(1.0, 5));
    let child = sb
        .cmd(&[f.to_str().unwrap()])
        .env("HUSE_DB_BUSY_TIMEOUT", "0.3")
        .env("HUSE_DB_RETRY", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let rt = rt();
    let url = format!("sqlite://{}", sb.db().display());
    let mut locker = rt.block_on(async {
        use sqlx::Connection;
        let t0 = Instant::now();
        loop {
            assert!(t0.elapsed() < Duration::from_secs(30), "the run never appeared");
            if let Ok(mut c) = sqlx::SqliteConnection::connect(&url).await
                && sqlx::query_scalar::<_, i64>("SELECT count(*) FROM runs").fetch_one(&mut c).await.unwrap_or(0) >= 1
            {
                sqlx::query("BEGIN IMMEDIATE").execute(&mut c).await.unwrap();
                break c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let out = common::Out(child.wait_with_output().unwrap());
    assert_eq!(out.code(), 1, "rows that could not be written must fail the invocation:\n{}", out.stderr());
    rt.block_on(async { sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap() });
    drop(locker);
    let spooled =
        spool_files(&sb.path().join("results.sqlite.spool")).into_iter().filter(|p| p.is_file()).collect::<Vec<_>>();
    assert_eq!(spooled.len(), 1, "one spool file: {spooled:?}");
    (spooled[0].clone(), out.stderr())
}

#[test]
fn a_run_whose_records_wait_in_a_spool_shows_failed_until_replayed() {
    let sb = Sandbox::new();
    // The lock is held until the run has ended: it could not even mark itself failed.
    let (_, err) = spool_a_busy_run(&sb);
    assert!(err.contains("could not mark the runs failed"), "{err}");
    let db = || sb.cmd(&[]);
    let raw = rt().block_on(async {
        use sqlx::Connection;
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", sb.db().display())).await.unwrap();
        sqlx::query_scalar::<_, String>("SELECT status FROM runs").fetch_one(&mut c).await.unwrap()
    });
    assert_eq!(raw, "running", "the row itself could not be changed");
    let listed = |args: &[&str]| {
        let o = db().args(args).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let csv = listed(&["runs", "-f", "csv"]);
    assert!(csv.lines().any(|l| l.starts_with("1,c,c,failed")), "shown as what it is:\n{csv}");
    assert!(listed(&["runs", "--status", "failed", "-f", "csv"]).lines().any(|l| l.starts_with("1,c,")));
    assert!(!listed(&["runs", "--status", "running", "-f", "csv"]).lines().any(|l| l.starts_with("1,c,")));
    let shown = listed(&["show", "1"]);
    assert!(shown.contains("results incomplete") && shown.contains("db replay"), "{shown}");
    // The replay writes the records and the run's real status.
    assert!(db().args(["db", "replay"]).status().unwrap().success());
    assert!(listed(&["runs", "-f", "csv"]).lines().any(|l| l.starts_with("1,c,c,succeeded")));
}

#[test]
fn spooled_records_never_replay_into_a_database_that_replaced_theirs() {
    let sb = Sandbox::new();
    let (spool, _) = spool_a_busy_run(&sb);
    // The database is replaced at the same path before anything replays the spool.
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", sb.db().display()));
    }
    let other = sb.write("n2.yaml", "name: n2\nstages:\n  s: { uses: toy-source, with: { count: 2 } }\n");
    sb.run(&[other.to_str().unwrap()]).expect(0);
    sb.run(&[other.to_str().unwrap()]).expect(0);
    let n2_rows = sb.count("SELECT count(*) FROM metrics");
    let out = sb.run(&["db", "replay"]).expect(1);
    let err = out.stderr();
    assert!(err.contains("set aside") && err.contains("another database"), "{err}");
    assert_eq!(
        sb.count("SELECT count(*) FROM metrics"),
        n2_rows,
        "no row of the old database's run entered the new one"
    );
    assert_eq!(sb.count("SELECT count(*) FROM metrics WHERE key = 'loss'"), 0);
    assert!(!spool.exists(), "the spool moved aside");
    let aside = sb.path().join("results.sqlite.spool/rejected").join(spool.file_name().unwrap());
    assert!(aside.is_file(), "kept, not deleted: {}", aside.display());
    let reason = std::fs::read_to_string(format!("{}.reason.txt", aside.display())).unwrap();
    assert!(reason.contains("another database"), "{reason}");
    // Queries say so too.
    assert!(sb.run(&["runs"]).expect(0).stderr().contains("set aside"));
}

#[test]
fn a_poisoned_spool_is_set_aside_and_the_others_are_replayed() {
    let sb = Sandbox::new();
    let (good, _) = spool_a_busy_run(&sb);
    // A second spool of the same database whose run does not exist, older than the good one.
    let text = std::fs::read_to_string(&good).unwrap();
    let id = text.split("\"id\":\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    let bad_text = text
        .replace(&id, &format!("{id}-poisoned"))
        .replace("\"run_id\":1,", "\"run_id\":999,")
        .replace("\"run_id\":1}", "\"run_id\":999}");
    let bad = good.with_file_name(format!("{id}-poisoned.jsonl"));
    std::fs::write(&bad, bad_text).unwrap();
    assert!(Command::new("touch").args(["-d", "1 hour ago"]).arg(&bad).status().unwrap().success());
    let out = sb.run(&["db", "replay"]).expect(1);
    let err = out.stderr();
    assert!(err.contains("poisoned") && err.contains("set aside") && err.contains("run 999"), "{err}");
    assert!(err.contains("remain unwritten"), "{err}");
    // The good spool was written whole, once.
    assert_eq!(sb.count("SELECT count(*) FROM metrics WHERE run_id = 1"), 7);
    assert_eq!(sb.sql("SELECT status FROM runs WHERE id = 1")[0][0], "succeeded");
    assert!(!good.exists() && !bad.exists());
    // It stays named (and the exit status says so) until someone deletes it.
    assert!(sb.run(&["db", "replay"]).expect(1).stderr().contains("poisoned"));
    std::fs::remove_dir_all(sb.path().join("results.sqlite.spool/rejected")).unwrap();
    assert!(sb.run(&["db", "replay"]).expect(0).stdout().contains("up to date"));
}

#[test]
fn another_machines_live_temporary_output_survives_a_sweep_of_the_shared_cache() {
    let sb = Sandbox::new();
    let tmp = sb.cache().join(".tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    // Node B's stage at work (its PID means nothing here), ours dead, and an abandoned one.
    let live_elsewhere = tmp.join("k1-999999999-0@0123456789ab");
    let dead_here = tmp.join(format!("k2-999999999-0@{}", huse_exec::cache::host_tag()));
    let abandoned = tmp.join("k3-999999999-0@0123456789ab");
    for d in [&live_elsewhere, &dead_here, &abandoned] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("part.bin"), "x").unwrap();
    }
    for p in [abandoned.join("part.bin"), abandoned.clone()] {
        assert!(Command::new("touch").args(["-d", "8 days ago"]).arg(&p).status().unwrap().success());
    }
    let f = sb.write("c.yaml", &chain(0.0, 0));
    sb.run(&[f.to_str().unwrap()]).expect(0);
    assert!(live_elsewhere.join("part.bin").exists(), "another machine's work in progress is left alone");
    assert!(!dead_here.exists(), "this machine's dead writer's folder is swept");
    assert!(!abandoned.exists(), "a folder untouched for longer than the stale age is swept");
}

#[test]
fn concurrent_no_cache_runs_sharing_a_cache_all_succeed() {
    let sb = Sandbox::new();
    let f = sb.write("c.yaml", &chain(0.2, 2));
    let f = f.to_str().unwrap();
    sb.run(&[f]).expect(0);
    let children: Vec<_> = (0..8)
        .map(|_| {
            sb.cmd(&[f, "--no-cache"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(sb.count("SELECT count(*) FROM runs WHERE status = 'succeeded'"), 9);
}

#[test]
fn sqlite_uris_and_odd_schemes_are_refused_and_passwords_never_printed() {
    let sb = Sandbox::new();
    let f = sb.write("c.yaml", &chain(0.0, 0));
    let f = f.to_str().unwrap();
    let err = sb.run(&["--db", "file:mem.db?mode=memory&cache=shared", f]).expect(2).stderr();
    assert!(err.contains("`file:` URIs are not accepted"), "{err}");
    assert_eq!(
        std::fs::read_dir(sb.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("file:"))
            .count(),
        0
    );
    // A file whose name starts with `file:` is still a file, named verbatim.
    sb.run(&["--db", "./file:foo.db", f]).expect(0);
    assert!(sb.path().join("file:foo.db").is_file() && !sb.path().join("foo.db").exists());
    for db in [
        "POSTGRES://u:sekrit@127.0.0.1:1/x",
        "Postgresql://u:sekrit@127.0.0.1:1/x",
        "postgres://u@127.0.0.1:1/db?password=sekrit",
        "MySQL://u:sekrit@h/db",
    ] {
        let out = sb.cmd(&["--db", db, "runs"]).output().unwrap();
        let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "{db}: {all}");
        assert!(!all.contains("sekrit"), "{db}: the password is printed: {all}");
        assert!(!all.contains("unknown database scheme `postgres"), "{db}: schemes are case-insensitive: {all}");
    }
}

#[test]
fn replay_says_records_remain_while_the_disk_is_full_and_queries_see_the_fallback_spool() {
    let sb = Sandbox::new();
    let Some(fs) = Tmpfs::for_test(&sb.path().join("small"), "2m", "replay_says_records_remain_while_the_disk_is_full")
    else {
        return;
    };
    let db = fs.0.join("r.sqlite");
    let run = |args: &[&str]| common::Out(sb.cmd(args).env("HUSE_DB", &db).env("HUSE_DB_RETRY", "1").output().unwrap());
    let tiny = sb.write("t.yaml", "name: t\nstages:\n  s: { uses: toy-source }\n");
    run(&[tiny.to_str().unwrap()]).expect(0);
    fs.fill_leaving(12);
    let f = sb.write("c.yaml", &chain(0.0, 20000));
    run(&[f.to_str().unwrap()]).expect(1);
    assert_eq!(spool_files(&sb.cache().join(".spool")).len(), 1);
    // The query warns of the cache's spool; replay with the disk still full is not success.
    assert!(run(&["runs"]).expect(0).stderr().contains("spooled and not yet in"));
    let out = run(&["db", "replay"]).expect(1);
    assert!(
        out.stderr().contains("remain unwritten") && out.stderr().contains("kept for the next replay"),
        "{}",
        out.stderr()
    );
    assert!(!out.stdout().contains("up to date"), "{}", out.stdout());
    assert_eq!(spool_files(&sb.cache().join(".spool")).len(), 1, "the spool is kept");
    fs.empty();
    run(&["db", "replay"]).expect(0);
}

#[test]
fn exporting_an_unknown_experiment_is_an_error_that_leaves_the_file_alone() {
    let sb = common::known_runs();
    let keep = sb.write("keep.csv", "precious\n");
    let err = sb.run(&["export", "-e", "nosuchexp", "--out", keep.to_str().unwrap()]).expect(1).stderr();
    assert!(err.contains("no experiment `nosuchexp`") && err.contains("experiments: q"), "{err}");
    assert_eq!(std::fs::read_to_string(&keep).unwrap(), "precious\n");
    assert!(sb.run(&["export", "-e", "nosuchexp"]).expect(1).stdout().is_empty());
}

#[test]
fn an_experiment_name_cannot_climb_out_of_a_folder() {
    let sb = Sandbox::new();
    for name in ["..", ".", ".hidden"] {
        let f = sb.write("d.yaml", &chain(0.0, 0).replacen("name: c", &format!("name: \"{name}\""), 1));
        let err = sb.run(&["validate", f.to_str().unwrap()]).expect(2).stderr();
        assert!(err.contains("not starting with `.`"), "{name}: {err}");
    }
}

#[test]
fn a_results_file_on_a_read_only_mount_can_be_queried() {
    let sb = Sandbox::new();
    let Some(fs) = Tmpfs::for_test(&sb.path().join("ro"), "8m", "a_results_file_on_a_read_only_mount_can_be_queried")
    else {
        return;
    };
    let db = fs.0.join("r.sqlite");
    let f = sb.write("c.yaml", &chain(0.0, 2));
    assert!(sb.cmd(&[f.to_str().unwrap()]).env("HUSE_DB", &db).status().unwrap().success());
    assert!(Command::new("mount").args(["-o", "remount,ro"]).arg(&fs.0).status().unwrap().success());
    let out = common::Out(sb.cmd(&["runs", "-f", "csv"]).env("HUSE_DB", &db).output().unwrap()).expect(0);
    assert!(out.stdout().lines().nth(1).is_some_and(|l| l.starts_with("1,c,c,succeeded")), "{}", out.stdout());
    common::Out(sb.cmd(&["show", "1"]).env("HUSE_DB", &db).output().unwrap()).expect(0);
}

#[test]
fn query_paper_cuts_name_what_exists() {
    let sb = Sandbox::new();
    // --max-runs holds without a sweep too.
    let f = sb.write("c.yaml", &chain(0.0, 0));
    let err = sb.run(&["validate", f.to_str().unwrap(), "--repeat", "3", "--max-runs", "2"]).expect(2).stderr();
    assert!(err.contains("more than the limit of 2"), "{err}");
    let m = sb.write(
        "m.yaml",
        "name: m\nstages:\n  source: { uses: toy-source, with: { count: 4 } }\n  \
         left: { uses: toy-scale, needs: [source] }\n  right: { uses: toy-scale, needs: [source], with: { factor: 3.0 } }\n  \
         total: { uses: toy-sum, needs: [left] }\n",
    );
    sb.run(&[m.to_str().unwrap()]).expect(0);
    // A misspelt condition key is named with the closest real one.
    let out = sb.run(&["runs", "-w", "sun>1"]).expect(0);
    assert!(
        out.stderr().contains("no run has a param or metric `sun`") && out.stderr().contains("did you mean `sum`"),
        "{}",
        out.stderr()
    );
    // A key two stages log: `best` names the qualified names that exist.
    let err = sb.run(&["best", "--metric", "mean"]).expect(1).stderr();
    assert!(err.contains("left.mean") && err.contains("right.mean"), "{err}");
    // The device is the run's column alone, filtered and shown as before.
    assert_eq!(sb.count("SELECT count(*) FROM params WHERE key = 'device'"), 0);
    assert_eq!(sb.run(&["runs", "-w", "device=auto", "-f", "csv"]).expect(0).stdout().lines().count(), 2);
    assert_eq!(sb.run(&["runs", "-w", "device=cpu", "-f", "csv"]).expect(0).stdout().lines().count(), 1);
    // An unknown experiment is said to be unknown.
    let err = sb.run(&["runs", "-e", "nosuch"]).expect(1).stderr();
    assert!(err.contains("no experiment `nosuch`"), "{err}");
}
