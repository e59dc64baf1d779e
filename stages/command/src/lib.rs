//! `huse-stage-command`: any program as a stage (`uses: command`), so that a PyTorch
//! variant, a pip package's encoder or a paper's evaluation script runs in the same DAG,
//! cache, sweeps and results database as the built-in stages.
//!
//! ```yaml
//! torch_train:
//!   uses: command
//!   needs: [encode, graph, ingest]
//!   with:
//!     run: [python3, experiments/scripts/train_torch.py, --epochs, "${params.epochs}"]
//!     inputs: [image.safetensors, text.safetensors, graph.safetensors, items.jsonl]
//!     outputs: [model.safetensors]
//!     files: [experiments/scripts/train_torch.py]
//!     params: { epochs: 30, beta: 0.5 }
//!     timeout: 2h
//! ```
//!
//! The program gets everything through its environment (and the same as one JSON file,
//! `$HUSE_STAGE_JSON`): `HUSE_OUT_DIR` (write the outputs here), `HUSE_WORK_DIR`
//! (checkpoints that survive an interruption), `HUSE_INPUT_<ARTIFACT>` (each input's path,
//! the name upper-cased with `.`/`-` as `_`), `HUSE_PARAMS` (the params as JSON),
//! `HUSE_SEED`, `HUSE_DEVICE`, `HUSE_THREADS` (its share of the cores; `OMP_NUM_THREADS`,
//! `MKL_NUM_THREADS` and `OPENBLAS_NUM_THREADS` are set to it unless `env:` says otherwise)
//! and `HUSE_METRICS`, a file it appends JSON lines of metrics to ([`metrics`]). argv and
//! `env:` values may use `${params.NAME}`, `${inputs.ARTIFACT}` and `${stage.FIELD}`
//! ([`template`]).
//!
//! The cache key covers argv, params, env, timeout, the content of `files:` and of the
//! inputs, and the seed (unless `seeded: false`). A non-zero exit, a missing output, a
//! malformed metrics line or the timeout fails the stage with the last lines of the
//! program's stderr; cancellation stops the program's whole process group ([`process`]).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use huse_stage_api::{Config, ConfigError, Context, Input, Inputs, Output, Stage, StageError, parse_config};
use serde::Deserialize;

pub mod metrics;
pub mod process;
pub mod template;

/// The `with:` block of a command stage.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// The program and its arguments, as a list (argv; no shell). With `shell: true`, one
    /// string run by `sh -c`. May use `${params.NAME}`, `${inputs.ARTIFACT}`, `${stage.FIELD}`
    /// (name, seed, device, threads, out_dir, work_dir, json, metrics).
    #[schemars(with = "RunSchema")]
    pub run: serde_json::Value,
    /// Run `run` (one string) through `sh -c`.
    #[serde(default)]
    pub shell: bool,
    /// The artifacts it reads, by name, from the stages it `needs`.
    #[serde(default)]
    pub inputs: Vec<String>,
    /// The artifacts it writes into `$HUSE_OUT_DIR`, by name (files or folders).
    #[serde(default)]
    pub outputs: Vec<String>,
    /// Outputs among `outputs` that are Markdown summaries, stored with the run and printed.
    #[serde(default)]
    pub summaries: Vec<String>,
    /// Files (the script, its modules) whose content enters the cache key; relative paths
    /// are from the folder huse-run runs in, as is the program's working folder.
    #[serde(default)]
    pub files: Vec<PathBuf>,
    /// Values for the program (`$HUSE_PARAMS`, `${params.NAME}`), swept and recorded like
    /// any stage's config.
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// Extra environment variables (values may use `${...}` references).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Stops the program (its whole process group) after this long, e.g. `90s`, `2h`.
    pub timeout: Option<String>,
    /// Whether the run's seed enters the cache key (a program that ignores `$HUSE_SEED` can
    /// say `false`, and one sweep's seeds share its output).
    #[serde(default = "yes")]
    pub seeded: bool,
}

/// What `run` may be, for the schema (`huse-run list --config command`); checked by hand in
/// [`CommandConfig::argv`] for errors at the exact item.
#[derive(schemars::JsonSchema)]
#[allow(dead_code)]
#[serde(untagged)]
enum RunSchema {
    Argv(Vec<String>),
    Line(String),
}

fn yes() -> bool {
    true
}

/// How many of the program's last stderr lines a failure shows.
const STDERR_LINES: usize = 20;

/// Artifact names: a file or folder name in the output directory.
fn check_artifact(name: &str) -> Result<(), String> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(format!("`{name}` is not a file name (artifacts are names inside the output folder)"));
    }
    Ok(())
}

/// The environment variable of input `artifact`: `HUSE_INPUT_` and its name upper-cased,
/// with every character other than a letter or digit as `_`.
pub fn input_var(artifact: &str) -> String {
    let tail: String =
        artifact.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("HUSE_INPUT_{tail}")
}

impl CommandConfig {
    /// The argv (before references are filled in).
    fn argv(&self) -> Result<Vec<String>, ConfigError> {
        match (&self.run, self.shell) {
            (serde_json::Value::String(s), true) => Ok(vec!["sh".into(), "-c".into(), s.clone()]),
            (serde_json::Value::String(_), false) => Err(ConfigError::at(
                "run",
                "a string runs through a shell only with `shell: true`; otherwise give argv as a list, e.g. [python3, train.py]",
            )),
            (serde_json::Value::Array(items), false) => {
                let mut argv = Vec::new();
                for (i, it) in items.iter().enumerate() {
                    match it {
                        serde_json::Value::String(s) => argv.push(s.clone()),
                        serde_json::Value::Number(n) => argv.push(n.to_string()),
                        other => {
                            return Err(ConfigError::at(
                                &format!("run.{i}"),
                                format!("expected a string, found {other}"),
                            ));
                        }
                    }
                }
                if argv.is_empty() {
                    return Err(ConfigError::at("run", "the list is empty: name the program to run"));
                }
                Ok(argv)
            }
            (serde_json::Value::Array(_), true) => {
                Err(ConfigError::at("shell", "`shell: true` takes `run` as one string (a list is argv already)"))
            }
            (other, _) => Err(ConfigError::at("run", format!("expected a list of arguments, found {other}"))),
        }
    }

    fn timeout(&self) -> Result<Option<Duration>, ConfigError> {
        self.timeout
            .as_deref()
            .map(|t| {
                humantime::parse_duration(t)
                    .map_err(|e| ConfigError::at("timeout", format!("`{t}` is not a duration such as 90s or 2h: {e}")))
            })
            .transpose()
    }

    fn check(&self) -> Result<(), ConfigError> {
        let argv = self.argv()?;
        for (i, a) in argv.iter().enumerate() {
            template::check(a, &self.params, &self.inputs).map_err(|e| ConfigError::at(&format!("run.{i}"), e))?;
        }
        let program = &argv[0];
        if !program.contains("${") && which::which(program).is_err() {
            return Err(ConfigError::at(
                "run.0",
                if program.contains('/') {
                    format!("the program `{program}` does not exist or cannot be run")
                } else {
                    format!("the program `{program}` is not found on PATH")
                },
            ));
        }
        for (field, names) in [("inputs", &self.inputs), ("outputs", &self.outputs), ("summaries", &self.summaries)] {
            for (i, n) in names.iter().enumerate() {
                check_artifact(n).map_err(|e| ConfigError::at(&format!("{field}.{i}"), e))?;
                if names[..i].contains(n) {
                    return Err(ConfigError::at(&format!("{field}.{i}"), format!("`{n}` is listed twice")));
                }
            }
        }
        for (i, s) in self.summaries.iter().enumerate() {
            if !self.outputs.contains(s) {
                return Err(ConfigError::at(&format!("summaries.{i}"), format!("`{s}` is not one of `outputs`")));
            }
        }
        for (i, f) in self.files.iter().enumerate() {
            if !f.is_file() {
                let cwd = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default();
                return Err(ConfigError::at(
                    &format!("files.{i}"),
                    format!("no file {} (relative paths are from the folder huse-run runs in: {cwd})", f.display()),
                ));
            }
        }
        for (k, v) in &self.env {
            if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(ConfigError::at(&format!("env.{k}"), "not an environment variable name"));
            }
            template::check(v, &self.params, &self.inputs).map_err(|e| ConfigError::at(&format!("env.{k}"), e))?;
        }
        self.timeout()?;
        Ok(())
    }
}

/// The command stage.
pub struct Command;

impl Stage for Command {
    fn kind(&self) -> &str {
        "command"
    }
    fn version(&self) -> &str {
        "1"
    }
    fn describe(&self) -> &str {
        "Runs any program as a stage: argv, inputs, outputs, params and metrics (JSON lines) declared in with:"
    }
    fn outputs(&self) -> Vec<Output> {
        Vec::new()
    }
    fn inputs_for(&self, config: &Config) -> Vec<Input> {
        parse_config::<CommandConfig>(config).map(|c| c.inputs.iter().map(Input::one).collect()).unwrap_or_default()
    }
    fn outputs_for(&self, config: &Config) -> Vec<Output> {
        let Ok(c) = parse_config::<CommandConfig>(config) else { return Vec::new() };
        c.outputs
            .iter()
            .map(|o| {
                if c.summaries.contains(o) {
                    Output::summary(o, "a Markdown summary the command writes")
                } else {
                    Output::new(o, "written by the command")
                }
            })
            .collect()
    }
    fn uses_seed(&self) -> bool {
        true
    }
    fn uses_seed_for(&self, config: &Config) -> bool {
        parse_config::<CommandConfig>(config).map(|c| c.seeded).unwrap_or(true)
    }
    fn uses_device(&self) -> bool {
        true
    }
    fn config_schema(&self) -> Option<serde_json::Value> {
        Some(schemars::schema_for!(CommandConfig).to_value())
    }
    fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        parse_config::<CommandConfig>(config)?.check()
    }
    fn reads(&self, config: &Config) -> Vec<PathBuf> {
        parse_config::<CommandConfig>(config).map(|c| c.files).unwrap_or_default()
    }
    fn run(&self, ctx: &Context, config: &Config, inputs: &Inputs) -> Result<(), StageError> {
        let cfg: CommandConfig = parse_config(config)?;
        cfg.check()?;
        run(ctx, &cfg, inputs)
    }
}

fn abs(p: &Path) -> String {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string()
}

fn run(ctx: &Context, cfg: &CommandConfig, inputs: &Inputs) -> Result<(), StageError> {
    let metrics_path = ctx.work_dir.join("metrics.jsonl");
    let stage_json = ctx.work_dir.join("stage.json");
    let stderr_path = ctx.work_dir.join("stderr.log");
    let stdout_path = ctx.work_dir.join("stdout.log");
    // A resumed attempt starts a fresh metrics file: the earlier attempt's rows are its run's.
    std::fs::write(&metrics_path, b"")?;
    let mut input_paths: BTreeMap<String, String> = BTreeMap::new();
    for name in &cfg.inputs {
        input_paths.insert(name.clone(), abs(inputs.get(name)?));
    }
    let stage: BTreeMap<&'static str, String> = [
        ("name", ctx.name.to_string()),
        ("seed", ctx.seed.to_string()),
        ("device", ctx.device.to_string()),
        ("threads", ctx.threads.to_string()),
        ("out_dir", abs(ctx.out_dir)),
        ("work_dir", abs(ctx.work_dir)),
        ("json", abs(&stage_json)),
        ("metrics", abs(&metrics_path)),
    ]
    .into();
    let values = template::Values { params: &cfg.params, inputs: &input_paths, stage: &stage };
    let description = serde_json::json!({
        "stage": ctx.name,
        "seed": ctx.seed,
        "device": ctx.device.to_string(),
        "threads": ctx.threads,
        "out_dir": stage["out_dir"],
        "work_dir": stage["work_dir"],
        "metrics": stage["metrics"],
        "inputs": input_paths,
        "outputs": cfg.outputs,
        "params": cfg.params,
    });
    std::fs::write(&stage_json, serde_json::to_vec_pretty(&description).map_err(StageError::of)?)?;

    let argv: Vec<String> =
        cfg.argv()?.iter().map(|a| template::fill(a, &values)).collect::<Result<_, _>>().map_err(StageError::msg)?;
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path)?)
        .stderr(std::fs::File::create(&stderr_path)?);
    for var in ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"] {
        cmd.env(var, ctx.threads.to_string());
    }
    cmd.env("HUSE_STAGE", ctx.name)
        .env("HUSE_STAGE_JSON", &stage["json"])
        .env("HUSE_OUT_DIR", &stage["out_dir"])
        .env("HUSE_WORK_DIR", &stage["work_dir"])
        .env("HUSE_METRICS", &stage["metrics"])
        .env("HUSE_PARAMS", serde_json::Value::Object(cfg.params.clone()).to_string())
        .env("HUSE_SEED", &stage["seed"])
        .env("HUSE_DEVICE", &stage["device"])
        .env("HUSE_THREADS", &stage["threads"]);
    for (name, path) in &input_paths {
        cmd.env(input_var(name), path);
    }
    for (k, v) in &cfg.env {
        cmd.env(k, template::fill(v, &values).map_err(StageError::msg)?);
    }
    let shown = argv.join(" ");
    let mut child = process::spawn(&mut cmd).map_err(|e| StageError::msg(format!("starting `{shown}`: {e}")))?;
    ctx.progress.start(&format!("{} (pid {})", argv[0], child.id()), None, "step");
    let mut tail = metrics::Tail::new(&metrics_path);
    let deadline = cfg.timeout()?.map(|t| (Instant::now() + t, t));
    let fail = |why: String| StageError::msg(format!("`{shown}` {why}{}", stderr_tail(&stderr_path)));
    let status = loop {
        if let Some(status) = child.try_wait()? {
            process::sweep(&child);
            break status;
        }
        if let Err(e) = tail.read(ctx.metrics, ctx.progress, false) {
            process::stop(&mut child)?;
            return Err(fail(format!("was stopped: {e}")));
        }
        if ctx.cancel.is_cancelled() {
            process::stop(&mut child)?;
            return Err(StageError::Cancelled);
        }
        if let Some((at, t)) = deadline
            && Instant::now() >= at
        {
            process::stop(&mut child)?;
            return Err(fail(format!("timed out after {} and was stopped", humantime::format_duration(t))));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    tail.read(ctx.metrics, ctx.progress, true).map_err(&fail)?;
    if !status.success() {
        let why = match status.code() {
            Some(c) => format!("exited with status {c}"),
            None => {
                use std::os::unix::process::ExitStatusExt;
                format!("was killed by signal {}", status.signal().unwrap_or(0))
            }
        };
        return Err(fail(why));
    }
    for o in &cfg.outputs {
        if !ctx.out_dir.join(o).exists() {
            return Err(fail(format!(
                "exited 0 but did not write its output `{o}` into $HUSE_OUT_DIR ({})",
                ctx.out_dir.display()
            )));
        }
    }
    Ok(())
}

/// The last lines of the program's stderr, as the end of an error message.
fn stderr_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        use std::io::Seek;
        let _ = f.seek(std::io::SeekFrom::Start(len.saturating_sub(64 << 10)));
        let mut bytes = Vec::new();
        let _ = f.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return "; its stderr is empty".into();
    }
    let from = lines.len().saturating_sub(STDERR_LINES);
    format!("; the last {} line(s) of its stderr:\n{}", lines.len() - from, lines[from..].join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use huse_stage_api::testing;

    fn cfg(v: serde_json::Value) -> Result<(), ConfigError> {
        Command.validate(&v)
    }

    #[test]
    fn configs_are_checked_at_the_key() {
        let ok = serde_json::json!({"run": ["sh", "-c", "true"], "outputs": ["a.txt"]});
        cfg(ok).unwrap();
        for (bad, path, why) in [
            (serde_json::json!({"run": "echo hi"}), "run", "shell: true"),
            (serde_json::json!({"run": []}), "run", "empty"),
            (serde_json::json!({"run": ["no-such-program-here"]}), "run.0", "not found on PATH"),
            (serde_json::json!({"run": ["sh", "${params.n}"]}), "run.1", "`params` does not have"),
            (serde_json::json!({"run": ["sh"], "outputs": ["a/b"]}), "outputs.0", "not a file name"),
            (serde_json::json!({"run": ["sh"], "summaries": ["t.md"]}), "summaries.0", "not one of `outputs`"),
            (serde_json::json!({"run": ["sh"], "files": ["no/such.py"]}), "files.0", "no file no/such.py"),
            (serde_json::json!({"run": ["sh"], "timeout": "soon"}), "timeout", "not a duration"),
            (serde_json::json!({"run": ["sh"], "env": {"A-B": "1"}}), "env.A-B", "not an environment"),
            (serde_json::json!({"run": ["sh"], "bogus": 1}), "bogus", "unknown field `bogus`"),
        ] {
            let e = cfg(bad.clone()).unwrap_err();
            assert_eq!(e.path.join("."), path, "{bad}: {e}");
            assert!(e.message.contains(why), "{bad}: {e}");
        }
        cfg(serde_json::json!({"run": "echo hi", "shell": true})).unwrap();
    }

    #[test]
    fn a_program_gets_its_inputs_params_and_budget_and_its_metrics_are_logged() {
        let d = tempfile::tempdir().unwrap();
        let input = d.path().join("in.txt");
        std::fs::write(&input, "4").unwrap();
        let mut inputs = Inputs::default();
        inputs.insert("in.txt", "up", input.clone());
        let script = r#"
            n=$(cat "$HUSE_INPUT_IN_TXT")
            echo "$((n * $1)) $HUSE_THREADS $OMP_NUM_THREADS $HUSE_PARAMS" > "$HUSE_OUT_DIR/out.txt"
            echo '{"step": 1, "total": 2, "loss": 0.5}' >> "$HUSE_METRICS"
            echo '{"step": 2, "loss": 0.25}' >> "$HUSE_METRICS"
            printf '{"final": {"acc": 0.75}}' >> "$HUSE_METRICS"
            grep -q '"seed": 7' "$HUSE_STAGE_JSON"
        "#;
        let config = serde_json::json!({
            "run": ["sh", "-c", script, "sh", "${params.k}"],
            "inputs": ["in.txt"], "outputs": ["out.txt"], "params": {"k": 3},
        });
        let out = d.path().join("out");
        let rec = testing::run(&Command, &config, &inputs, &out, 7).unwrap();
        let text = std::fs::read_to_string(out.join("out.txt")).unwrap();
        let threads = std::thread::available_parallelism().unwrap().get();
        assert_eq!(text.trim(), format!("12 {threads} {threads} {{\"k\":3}}"));
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![("loss".to_string(), 1, 0.5), ("loss".to_string(), 2, 0.25), ("acc".to_string(), 0, 0.75)]
        );
    }

    #[test]
    fn failures_say_why_with_the_end_of_stderr() {
        let d = tempfile::tempdir().unwrap();
        let run = |script: &str, extra: serde_json::Value| {
            let mut config = serde_json::json!({"run": ["sh", "-c", script], "outputs": ["o"]});
            config.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            testing::run(&Command, &config, &Inputs::default(), &d.path().join("out"), 0).unwrap_err().to_string()
        };
        let e = run("echo first >&2; echo 'boom: no GPU' >&2; exit 3", serde_json::json!({}));
        assert!(e.contains("exited with status 3") && e.contains("first\nboom: no GPU"), "{e}");
        let e = run("echo made nothing >&2", serde_json::json!({}));
        assert!(e.contains("did not write its output `o`") && e.contains("made nothing"), "{e}");
        let e = run("echo 'loss=1' >> \"$HUSE_METRICS\"; sleep 30", serde_json::json!({}));
        assert!(e.contains("metrics line 1") && e.contains("loss=1"), "{e}");
        let clock = Instant::now();
        let e = run("echo waiting >&2; sleep 30", serde_json::json!({"timeout": "1s"}));
        assert!(e.contains("timed out after 1s") && e.contains("waiting"), "{e}");
        assert!(clock.elapsed() < Duration::from_secs(10), "stopped at once, not after the sleep");
    }
}
