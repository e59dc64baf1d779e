//! The metrics a command writes: JSON lines appended to `$HUSE_METRICS`, read while the
//! program runs (so the results app sees them live) and once more when it ends.
//!
//! A line is one JSON object:
//! * `{"step": 3, "loss": 0.41, "val.acc.both": 0.91}` — history: every other key at that step;
//!   an optional `"total": 30` sizes the progress bar (steps of the whole run);
//! * `{"final": {"test.acc.image": 0.93}}` — single-valued metrics (step 0, as built-in stages
//!   log them);
//! * values are numbers, or `null` for a value that is not a number (NaN).
//!
//! Anything else — not JSON, not an object, a value that is not a number — is an error that
//! names the line.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use huse_stage_api::{MetricLogger, Progress};

/// One parsed line: `(key, step, value)` of each metric, and the progress total if given.
#[derive(Debug, PartialEq)]
pub struct Line {
    /// The metrics of the line.
    pub values: Vec<(String, i64, f64)>,
    /// The step, for history lines.
    pub step: Option<i64>,
    /// `"total"`: the steps of the whole run.
    pub total: Option<u64>,
}

fn number(v: &serde_json::Value, key: &str) -> Result<f64, String> {
    match v {
        serde_json::Value::Number(n) => n.as_f64().ok_or_else(|| format!("`{key}` is out of range")),
        serde_json::Value::Null => Ok(f64::NAN),
        other => Err(format!("`{key}` is {other}, not a number")),
    }
}

/// Parses one line (see the module doc).
pub fn parse(text: &str) -> Result<Line, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    if let Some(f) = obj.get("final") {
        if obj.len() > 1 {
            return Err("a `final` line holds only `final`".into());
        }
        let f = f.as_object().ok_or("`final` is not an object of metrics")?;
        let values = f.iter().map(|(k, v)| Ok((k.clone(), 0, number(v, k)?))).collect::<Result<_, String>>()?;
        return Ok(Line { values, step: None, total: None });
    }
    let step = match obj.get("step") {
        Some(s) => Some(s.as_i64().filter(|s| *s >= 0).ok_or("`step` is not a whole number >= 0")?),
        None => return Err("a metrics line needs `step` (history) or `final`".into()),
    };
    let total = match obj.get("total") {
        Some(t) => Some(t.as_u64().ok_or("`total` is not a whole number >= 0")?),
        None => None,
    };
    let mut values = Vec::new();
    for (k, v) in obj {
        if k != "step" && k != "total" {
            values.push((k.clone(), step.unwrap_or(0), number(v, k)?));
        }
    }
    Ok(Line { values, step, total })
}

/// Reads the metrics file as it grows, logging each complete line once.
pub struct Tail {
    path: PathBuf,
    offset: u64,
    partial: String,
    lines: usize,
    last_step: u64,
    total: Option<u64>,
}

impl Tail {
    /// A tail of the file at `path` (which need not exist yet).
    pub fn new(path: &Path) -> Tail {
        Tail { path: path.to_path_buf(), offset: 0, partial: String::new(), lines: 0, last_step: 0, total: None }
    }

    /// Logs the complete lines written since the last call; `at_end`: the program has
    /// ended, so a last line without its newline counts too. An error names the bad line.
    pub fn read(&mut self, metrics: &dyn MetricLogger, progress: &dyn Progress, at_end: bool) -> Result<(), String> {
        let mut chunk = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.path) {
            f.seek(SeekFrom::Start(self.offset)).map_err(|e| format!("reading {}: {e}", self.path.display()))?;
            let n = f.read_to_string(&mut chunk).map_err(|e| format!("reading {}: {e}", self.path.display()))?;
            self.offset += n as u64;
        }
        self.partial.push_str(&chunk);
        let mut complete: Vec<String> = Vec::new();
        while let Some(i) = self.partial.find('\n') {
            complete.push(self.partial[..i].to_string());
            self.partial.drain(..=i);
        }
        if at_end && !self.partial.trim().is_empty() {
            complete.push(std::mem::take(&mut self.partial));
        }
        for text in complete {
            self.lines += 1;
            if text.trim().is_empty() {
                continue;
            }
            let line = parse(&text).map_err(|e| {
                format!(
                    "metrics line {} of {}: {e}: {}",
                    self.lines,
                    self.path.display(),
                    text.chars().take(200).collect::<String>()
                )
            })?;
            // A new total starts the bar; the same total again (on every line) moves it on.
            if line.total.is_some() && line.total != self.total {
                self.total = line.total;
                progress.start("steps", line.total, "step");
                self.last_step = 0;
            }
            for (k, step, v) in &line.values {
                metrics.log(k, *step, *v);
            }
            if let Some(s) = line.step.map(|s| s as u64) {
                if s > self.last_step {
                    progress.inc(s - self.last_step);
                    self.last_step = s;
                }
                let shown: Vec<String> = line.values.iter().take(3).map(|(k, _, v)| format!("{k} {v:.4}")).collect();
                progress.message(&shown.join(", "));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use huse_stage_api::testing::{NoProgress, Recorded};

    #[test]
    fn lines_parse_or_say_why_not() {
        let l = parse(r#"{"step": 3, "loss": 0.5, "acc": null, "total": 10}"#).unwrap();
        assert_eq!((l.step, l.total), (Some(3), Some(10)));
        assert_eq!(l.values[1], ("loss".to_string(), 3, 0.5));
        assert!(l.values[0].2.is_nan());
        let f = parse(r#"{"final": {"test.acc": 0.9}}"#).unwrap();
        assert_eq!(f.values, vec![("test.acc".to_string(), 0, 0.9)]);
        for (bad, why) in [
            ("loss=3", "not JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"loss": 1}"#, "needs `step`"),
            (r#"{"step": -1, "loss": 1}"#, "whole number"),
            (r#"{"step": 1, "loss": "low"}"#, "not a number"),
            (r#"{"final": {"a": 1}, "step": 2}"#, "only `final`"),
        ] {
            assert!(parse(bad).unwrap_err().contains(why), "{bad}: {:?}", parse(bad));
        }
    }

    /// Counts bar starts and the position.
    #[derive(Default)]
    struct Bar(std::sync::Mutex<(usize, u64)>);
    impl Progress for Bar {
        fn start(&self, _: &str, _: Option<u64>, _: &str) {
            let mut s = self.0.lock().unwrap();
            *s = (s.0 + 1, 0);
        }
        fn inc(&self, n: u64) {
            self.0.lock().unwrap().1 += n;
        }
        fn message(&self, _: &str) {}
    }

    #[test]
    fn the_same_total_on_every_line_moves_one_bar_on() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.jsonl");
        let lines: String = (1..=4).map(|s| format!("{{\"step\": {s}, \"total\": 10, \"loss\": 1}}\n")).collect();
        std::fs::write(&p, lines).unwrap();
        let bar = Bar::default();
        Tail::new(&p).read(&Recorded::default(), &bar, true).unwrap();
        assert_eq!(*bar.0.lock().unwrap(), (1, 4), "one start, then steps 1..4");
    }

    #[test]
    fn the_tail_logs_each_complete_line_once() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.jsonl");
        let rec = Recorded::default();
        let mut t = Tail::new(&p);
        t.read(&rec, &NoProgress, false).unwrap(); // no file yet
        std::fs::write(&p, "{\"step\": 1, \"loss\": 2}\n{\"step\": 2, \"lo").unwrap();
        t.read(&rec, &NoProgress, false).unwrap();
        assert_eq!(rec.0.lock().unwrap().len(), 1);
        std::fs::write(&p, "{\"step\": 1, \"loss\": 2}\n{\"step\": 2, \"loss\": 1}\n\n{\"final\": {\"acc\": 0.5}}")
            .unwrap();
        t.read(&rec, &NoProgress, false).unwrap();
        assert_eq!(rec.0.lock().unwrap().len(), 2, "the unterminated last line waits");
        t.read(&rec, &NoProgress, true).unwrap();
        assert_eq!(rec.last("acc"), Some(0.5));
        assert_eq!(rec.0.lock().unwrap().len(), 3);
        let bad = d.path().join("bad.jsonl");
        std::fs::write(&bad, "{\"step\": 1, \"loss\": 2}\nnope\n").unwrap();
        let e = Tail::new(&bad).read(&rec, &NoProgress, false).unwrap_err();
        assert!(e.contains("metrics line 2") && e.contains("nope"), "{e}");
    }
}
