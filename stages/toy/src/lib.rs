//! Toy stages: tiny, model-free stages that exercise the runner (DAG order, overlap,
//! cache, sweeps, cancellation, failures) and show how a stage is written.
//!
//! * `toy-source` writes `numbers.json`, the integers `0..count`;
//! * `toy-scale` reads `numbers`, writes `scaled.json` = `factor * x + offset`, can log
//!   `metrics` steps of a fake loss, sleep `seconds` (checking cancellation), `fail`, or
//!   fail while the file `fail_while` exists (a transient fault);
//! * `toy-sum` reads every upstream `scaled` artifact and writes/logs their sum.
//!
//! Each stage records in `timing.json` when it ran and its thread budget (and the size of
//! the rayon pool it ran in), so tests can check overlap and core sharing.
#![deny(missing_docs)]

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use huse_stage_api::{Config, ConfigError, Context, Decision, Input, Inputs, Output, Stage, StageError, parse_config};
use serde::Deserialize;

/// All toy stages, for registration with the runner.
pub fn stages() -> Vec<Box<dyn Stage>> {
    vec![Box::new(Source), Box::new(Scale), Box::new(Sum)]
}

fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Sleeps `seconds` in small slices, ticking progress and honouring cancellation.
fn busy(ctx: &Context, seconds: f64) -> Result<(), StageError> {
    let ticks = (seconds * 100.0).round() as u64;
    ctx.progress.start("sleep", Some(ticks), "tick");
    let start = Instant::now();
    for i in 1..=ticks {
        ctx.cancel.check()?;
        let target = Duration::from_millis(10 * i);
        if let Some(rest) = target.checked_sub(start.elapsed()) {
            std::thread::sleep(rest);
        }
        ctx.progress.inc(1);
    }
    Ok(())
}

fn write_json(dir: &Path, name: &str, v: &serde_json::Value) -> Result<(), StageError> {
    std::fs::write(dir.join(name), serde_json::to_vec(v).map_err(|e| StageError::msg(e.to_string()))?)?;
    Ok(())
}

fn read_numbers(path: &Path) -> Result<Vec<f64>, StageError> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| StageError::msg(format!("{}: {e}", path.display())))
}

fn timed(ctx: &Context, f: impl FnOnce() -> Result<(), StageError>) -> Result<(), StageError> {
    let start = now_s();
    f()?;
    // With the thread budget the stage got and the size of the pool it runs in.
    let pool = rayon::current_num_threads();
    write_json(
        ctx.out_dir,
        "timing.json",
        &serde_json::json!({"start": start, "end": now_s(), "threads": ctx.threads, "pool": pool}),
    )
}

/// `toy-source`: writes the integers `0..count`.
pub struct Source;

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SourceCfg {
    /// How many integers to write (default 10).
    #[serde(default = "ten")]
    count: u32,
    /// Seconds to sleep first (checking cancellation).
    #[serde(default)]
    seconds: f64,
}
fn ten() -> u32 {
    10
}

impl Stage for Source {
    fn kind(&self) -> &str {
        "toy-source"
    }
    fn version(&self) -> &str {
        "1"
    }
    fn describe(&self) -> &str {
        "writes the integers 0..count (toy stage for tests and examples)"
    }
    fn config_schema(&self) -> Option<serde_json::Value> {
        Some(schemars::schema_for!(SourceCfg).to_value())
    }
    fn outputs(&self) -> Vec<Output> {
        vec![Output::new("numbers.json", "JSON list of numbers"), Output::new("timing.json", "start/end times")]
    }
    fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        let c: SourceCfg = parse_config(config)?;
        if c.seconds < 0.0 {
            return Err(ConfigError::at("seconds", "must be >= 0"));
        }
        Ok(())
    }
    fn run(&self, ctx: &Context, config: &Config, _inputs: &Inputs) -> Result<(), StageError> {
        let c: SourceCfg = parse_config(config)?;
        timed(ctx, || {
            busy(ctx, c.seconds)?;
            let v: Vec<f64> = (0..c.count).map(f64::from).collect();
            write_json(ctx.out_dir, "numbers.json", &serde_json::json!(v))
        })
    }
}

/// `toy-scale`: `factor * x + offset` for every upstream number.
pub struct Scale;

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ScaleCfg {
    /// The factor (default 1).
    #[serde(default = "one")]
    factor: f64,
    /// Added after scaling.
    #[serde(default)]
    offset: f64,
    /// Seconds to sleep first (checking cancellation).
    #[serde(default)]
    seconds: f64,
    /// Log this many steps of a fake, decreasing `loss` metric.
    #[serde(default)]
    metrics: u32,
    /// Also log `loss + offset` under this name at steps 1.. (as epochs) and report each step
    /// to the runner, stopping when a study's pruner says so.
    #[serde(default)]
    report_as: Option<String>,
    /// Fail on purpose with this message.
    #[serde(default)]
    fail: Option<String>,
    /// Fail while this file exists: a transient fault (tests of resubmission remove it).
    #[serde(default)]
    fail_while: Option<String>,
    /// Add the run seed to every number (makes the stage seed-dependent).
    #[serde(default)]
    add_seed: bool,
}
fn one() -> f64 {
    1.0
}

impl Stage for Scale {
    fn uses_device(&self) -> bool {
        // stands for a device stage in the scheduler tests (it ignores the device).
        true
    }

    fn kind(&self) -> &str {
        "toy-scale"
    }
    fn version(&self) -> &str {
        "1"
    }
    fn describe(&self) -> &str {
        "scales upstream numbers; can sleep, log fake metrics or fail (toy stage)"
    }
    fn config_schema(&self) -> Option<serde_json::Value> {
        Some(schemars::schema_for!(ScaleCfg).to_value())
    }
    fn inputs(&self) -> Vec<Input> {
        vec![Input::one("numbers.json")]
    }
    fn outputs(&self) -> Vec<Output> {
        vec![Output::new("scaled.json", "JSON list of numbers"), Output::new("timing.json", "start/end times")]
    }
    fn uses_seed(&self) -> bool {
        true
    }
    fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        let c: ScaleCfg = parse_config(config)?;
        if !c.factor.is_finite() {
            return Err(ConfigError::at("factor", "must be a finite number"));
        }
        if c.seconds < 0.0 {
            return Err(ConfigError::at("seconds", "must be >= 0"));
        }
        Ok(())
    }
    fn run(&self, ctx: &Context, config: &Config, inputs: &Inputs) -> Result<(), StageError> {
        let c: ScaleCfg = parse_config(config)?;
        timed(ctx, || {
            busy(ctx, c.seconds)?;
            if let Some(m) = &c.fail {
                return Err(StageError::msg(m.clone()));
            }
            if let Some(p) = c.fail_while.as_deref().filter(|p| Path::new(p).exists()) {
                return Err(StageError::msg(format!("failing while {p} exists")));
            }
            let seed = if c.add_seed { ctx.seed as f64 } else { 0.0 };
            let v: Vec<f64> =
                read_numbers(inputs.get("numbers.json")?)?.iter().map(|x| c.factor * x + c.offset + seed).collect();
            for step in 0..c.metrics {
                let loss = c.factor / f64::from(step + 1);
                ctx.metrics.log("loss", i64::from(step), loss);
                if let Some(name) = &c.report_as {
                    ctx.metrics.log(name, i64::from(step + 1), loss + c.offset);
                    if ctx.metrics.report(i64::from(step + 1)) == Decision::Stop {
                        return Err(StageError::Pruned(i64::from(step + 1)));
                    }
                }
            }
            ctx.metrics.log("mean", 0, v.iter().sum::<f64>() / v.len().max(1) as f64);
            write_json(ctx.out_dir, "scaled.json", &serde_json::json!(v))
        })
    }
}

/// `toy-sum`: sums every upstream `scaled` list.
pub struct Sum;

/// `toy-sum`'s settings.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SumCfg {
    /// Also log the total under this name (e.g. `val.sum`, for a search's objective).
    #[serde(default)]
    also_as: Option<String>,
}

impl Stage for Sum {
    fn kind(&self) -> &str {
        "toy-sum"
    }
    fn version(&self) -> &str {
        "1"
    }
    fn describe(&self) -> &str {
        "sums the numbers of every upstream toy-scale (toy stage)"
    }
    fn headline(&self) -> Vec<String> {
        vec!["sum".into()]
    }
    fn inputs(&self) -> Vec<Input> {
        vec![Input::many("scaled.json")]
    }
    fn outputs(&self) -> Vec<Output> {
        vec![Output::new("sum.json", "the total"), Output::new("timing.json", "start/end times")]
    }
    fn config_schema(&self) -> Option<serde_json::Value> {
        Some(schemars::schema_for!(SumCfg).to_value())
    }
    fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        parse_config::<SumCfg>(config).map(|_| ())
    }
    fn run(&self, ctx: &Context, config: &Config, inputs: &Inputs) -> Result<(), StageError> {
        let c: SumCfg = parse_config(config)?;
        timed(ctx, || {
            let mut total = 0.0;
            for (_, path) in inputs.all("scaled.json") {
                total += read_numbers(path)?.iter().sum::<f64>();
            }
            ctx.metrics.log("sum", 0, total);
            if let Some(name) = &c.also_as {
                ctx.metrics.log(name, 0, total);
            }
            write_json(ctx.out_dir, "sum.json", &serde_json::json!(total))
        })
    }
}
