//! Progress display: one indicatif line per running stage on a terminal, plain log
//! lines (at most one every few seconds per stage) elsewhere. Also the tracing writer
//! that keeps log lines from tearing the bars.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use huse_stage_api::Progress;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The set of progress lines of one `huse-run` process.
#[derive(Clone)]
pub struct Display {
    multi: MultiProgress,
    fancy: bool,
    quiet: bool,
}

impl Display {
    /// Bars when stderr is a terminal, plain lines otherwise.
    pub fn new() -> Self {
        let fancy = std::io::stderr().is_terminal();
        let multi = MultiProgress::with_draw_target(if fancy {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        Display { multi, fancy, quiet: false }
    }

    /// No progress at all (`-q`): neither bars nor plain lines.
    pub fn quiet() -> Self {
        Display { multi: MultiProgress::with_draw_target(ProgressDrawTarget::hidden()), fancy: false, quiet: true }
    }

    /// A progress reporter for one stage run, labelled `label`.
    pub fn stage(&self, label: &str) -> StageProgress {
        let bar = self.multi.add(ProgressBar::no_length());
        bar.set_prefix(label.to_string());
        bar.set_style(spinner_style());
        bar.enable_steady_tick(Duration::from_millis(200));
        StageProgress {
            bar,
            fancy: self.fancy,
            quiet: self.quiet,
            label: label.to_string(),
            state: Mutex::new(Plain::default()),
        }
    }

    /// The sweep's own line: `runs [====>   ] k/N` on a terminal (above the stages' lines),
    /// a log line `run k of N ended: NAME` per run elsewhere.
    pub fn runs(&self, total: u64) -> RunsProgress {
        let bar = self.multi.insert(0, ProgressBar::new(total));
        bar.set_style(
            ProgressStyle::with_template("{prefix:.bold} [{bar:30}] {pos}/{len} ended ({msg}) [{elapsed}, eta {eta}]")
                .unwrap()
                .progress_chars("=> "),
        );
        bar.set_prefix("runs");
        bar.set_message("0 failed");
        RunsProgress { bar, total, failed: std::sync::atomic::AtomicU64::new(0) }
    }

    /// Runs `f` with the bars hidden (for printing).
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.multi.suspend(f)
    }
}

impl Default for Display {
    fn default() -> Self {
        Self::new()
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix:.bold} {wide_msg} [{elapsed}]").unwrap()
}

fn bar_style(unit: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{{spinner}} {{prefix:.bold}} {{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{per_sec}}, eta {{eta}})"
    ))
    .unwrap()
    .progress_chars("=> ")
}

/// Progress of a sweep's runs (see [`Display::runs`]).
pub struct RunsProgress {
    bar: ProgressBar,
    total: u64,
    failed: std::sync::atomic::AtomicU64,
}

impl RunsProgress {
    /// The `k`-th run to end was `name`; `ok` unless a stage of it failed or was skipped.
    pub fn run_ended(&self, k: usize, name: &str, ok: bool) {
        let failed = self.failed.fetch_add(u64::from(!ok), std::sync::atomic::Ordering::SeqCst) + u64::from(!ok);
        self.bar.set_position(k as u64);
        self.bar.set_message(format!("{failed} failed"));
        tracing::info!("run {k} of {} ended: {name}{}", self.total, if ok { "" } else { " (not succeeded)" });
        if k as u64 >= self.total {
            self.bar.finish_and_clear();
        }
    }
}

#[derive(Default)]
struct Plain {
    phase: String,
    unit: String,
    total: Option<u64>,
    pos: u64,
    started: Option<Instant>,
    last: Option<Instant>,
    /// The stage's latest message (e.g. the running loss), shown after the count.
    msg: String,
}

/// Progress of one stage run.
pub struct StageProgress {
    bar: ProgressBar,
    fancy: bool,
    quiet: bool,
    label: String,
    state: Mutex<Plain>,
}

impl StageProgress {
    /// Removes the line.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }

    fn plain_line(&self, s: &Plain, force: bool) {
        let now = Instant::now();
        if !force && s.last.is_some_and(|l| now - l < Duration::from_secs(5)) {
            return;
        }
        let rate = s.started.map(|t| s.pos as f64 / (now - t).as_secs_f64().max(1e-9)).unwrap_or(0.0);
        let total = s.total.map(|t| format!("/{t}")).unwrap_or_default();
        let msg = if s.msg.is_empty() { String::new() } else { format!(" {}", s.msg) };
        let line = format!("[{}] {}: {}{} {} ({rate:.1} {}/s){msg}", self.label, s.phase, s.pos, total, s.unit, s.unit);
        let _ = writeln!(std::io::stderr(), "{line}");
    }
}

impl Progress for StageProgress {
    fn start(&self, phase: &str, total: Option<u64>, unit: &str) {
        self.bar.reset();
        self.bar.set_message(phase.to_string());
        match total {
            Some(t) => {
                self.bar.set_length(t);
                self.bar.set_style(bar_style(unit));
            }
            None => {
                self.bar.unset_length();
                self.bar.set_style(spinner_style());
            }
        }
        let mut s = self.state.lock().unwrap();
        *s = Plain {
            phase: phase.to_string(),
            unit: unit.to_string(),
            total,
            pos: 0,
            started: Some(Instant::now()),
            last: Some(Instant::now()),
            msg: String::new(),
        };
    }

    fn inc(&self, n: u64) {
        self.bar.inc(n);
        if !self.fancy && !self.quiet {
            let mut s = self.state.lock().unwrap();
            s.pos += n;
            let done = s.total.is_some_and(|t| s.pos >= t);
            let before = s.last;
            self.plain_line(&s, done);
            if done || before.is_some_and(|l| l.elapsed() >= Duration::from_secs(5)) {
                s.last = Some(Instant::now());
            }
        }
    }

    fn message(&self, msg: &str) {
        let mut s = self.state.lock().unwrap();
        s.msg = msg.to_string();
        self.bar.set_message(format!("{} {msg}", s.phase));
    }
}

/// A tracing writer that prints above the progress bars.
#[derive(Clone)]
pub struct LogWriter(pub Display);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogLine;
    fn make_writer(&'a self) -> LogLine {
        LogLine { display: self.0.clone(), buf: Vec::new() }
    }
}

/// One buffered log record, written on drop.
pub struct LogLine {
    display: Display,
    buf: Vec<u8>,
}

impl Write for LogLine {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.display.suspend(|| {
            let _ = std::io::stderr().write_all(&buf);
        });
    }
}
