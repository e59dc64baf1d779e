//! The `ingest` stage: reads a product table and its images into items with a class path,
//! filters small classes, and makes a seeded, stratified train/val/test split.
//!
//! Two table layouts are supported through configuration:
//! * several class columns: `classes: [masterCategory, subCategory, articleType]` (Kaggle);
//! * one column with a separator: `class_column: classes`, `class_separator: "<"` (the
//!   seed project's `image,text,classes` with `shoes<boots<ankle`).
//!
//! A leaf class is the whole path (the same leaf name can sit under different parents).
//! Bad rows (missing or undecodable image, empty text, missing class level) either stop
//! the stage with the row number, id and column (`bad_rows: error`, the default) or are
//! skipped and counted as metrics (`bad_rows: skip`).
//!
//! An `image` value that is an `http(s)://` URL is downloaded once into a shared,
//! content-addressed folder ([`download`]); a download that fails is a bad row
//! (`download_failed`).
//!
//! Outputs: `items.jsonl` (id, absolute image path, text, class index, split) and
//! `classes.json` (leaf classes with counts, every level's nodes with parent links).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use huse_data::{Artifact, ClassTree, Item, Split};

pub mod clean;
pub mod download;
pub mod hub;
use huse_stage_api::{Config, ConfigError, Context, Inputs, Output, Stage, StageError, parse_config};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Deserialize;

/// The stage.
pub struct Ingest;

/// What to do with a bad row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BadRows {
    /// Stop at the first bad row, naming its line (default).
    #[default]
    Error,
    /// Skip bad rows and count them by reason.
    Skip,
}

/// How thoroughly images are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CheckImages {
    /// Decode every image (finds corrupt files up front).
    #[default]
    Decode,
    /// Only check that the file exists.
    Exists,
}

/// Split ratios and seed.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SplitCfg {
    /// Share of each class for training.
    pub train: f64,
    /// Share for validation.
    pub val: f64,
    /// Share for the test.
    pub test: f64,
    /// Seed of the shuffle (independent of the run seed, so seed repetitions share the split).
    pub seed: u64,
}
/// The defaults, written once: 80 / 10 / 10, seed 0.
impl Default for SplitCfg {
    fn default() -> Self {
        SplitCfg { train: 0.8, val: 0.1, test: 0.1, seed: 0 }
    }
}

/// The stage's config (`with:`).
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestCfg {
    /// Dataset directory.
    pub root: PathBuf,
    /// Table file inside `root`.
    #[serde(default = "d_table")]
    pub table: String,
    /// The column with each item's id (default `id`).
    #[serde(default = "d_id")]
    pub id_column: String,
    /// Image path relative to `root`, with `{column}` placeholders.
    #[serde(default = "d_image")]
    pub image: String,
    /// The column with each item's text (default `productDisplayName`).
    #[serde(default = "d_text")]
    pub text_column: String,
    /// Text from several columns: `"{title}. {description}"` (overrides `text_column`);
    /// an empty column drops its part and the separator before it.
    #[serde(default)]
    pub text: Option<String>,
    /// Text cleaning before anything else sees the text (see [`clean`]).
    #[serde(default)]
    pub clean: clean::CleanCfg,
    /// Class path from several columns, root first.
    #[serde(default)]
    pub classes: Option<Vec<String>>,
    /// Class path from one column...
    #[serde(default)]
    pub class_column: Option<String>,
    /// ...split at this separator (any length, e.g. ` >> `). A value that is a JSON list
    /// of strings (`["A >> B >> C"]`) is unwrapped to its first element.
    #[serde(default = "d_sep")]
    pub class_separator: String,
    /// Keep the first N levels of each path.
    #[serde(default)]
    pub class_levels: Option<usize>,
    /// A path shorter than `class_levels`: `drop` the row (a bad row) or `repeat` its last level.
    #[serde(default)]
    pub class_pad: ClassPad,
    /// The path's last level is the item's own name (not a class): remove it first.
    #[serde(default)]
    pub class_drop_last: bool,
    /// Classes with fewer usable items are dropped (default 1: none).
    #[serde(default = "d_min")]
    pub min_items_per_class: usize,
    /// Keep only the first N usable rows (quick experiments).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Attribute columns kept on each item (e.g. `[baseColour, usage]`): with them every item
    /// also gets a search query from its attribute values and leaf class (`navy blue casual
    /// tshirts`), which encode encodes and evaluate scores (the attribute benchmark).
    #[serde(default)]
    pub attributes: Vec<String>,
    /// Keep at most N items of each class (the first ones).
    #[serde(default)]
    pub per_class_cap: Option<usize>,
    /// The stratified train / val / test split.
    #[serde(default)]
    pub split: SplitCfg,
    /// A bad row (missing image, empty text, ...): `error` stops the stage naming it, `skip` counts it.
    #[serde(default)]
    pub bad_rows: BadRows,
    /// `decode` every image (slow, sure) or check that it `exists`.
    #[serde(default)]
    pub check_images: CheckImages,
    /// How images given as `http(s)://` URLs are downloaded (see [`download`]).
    #[serde(default)]
    pub download: download::DownloadCfg,
    /// With `root: hf:ORG/NAME[@REVISION]`: which split (and config) of the Hub dataset.
    #[serde(default)]
    pub hub: hub::HubCfg,
    /// Accept image paths that lead outside `root` (absolute, or through `..`). Off by
    /// default: such a row is a bad row, so a table cannot make the tool read (or `serve`
    /// show) files elsewhere on the machine.
    #[serde(default)]
    pub allow_outside_root: bool,
}
/// What to do with a class path shorter than `class_levels`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ClassPad {
    /// Treat the row as bad (`bad_rows` decides: error or skip).
    #[default]
    Drop,
    /// Repeat the last level until the path has `class_levels` levels.
    Repeat,
}

fn d_table() -> String {
    "styles.csv".into()
}
fn d_id() -> String {
    "id".into()
}
fn d_image() -> String {
    "images/{id}.jpg".into()
}
fn d_text() -> String {
    "productDisplayName".into()
}
fn d_sep() -> String {
    "<".into()
}
fn d_min() -> usize {
    1
}

impl IngestCfg {
    fn check(&self) -> Result<(), ConfigError> {
        if let Some(Err(e)) = hub::parse(&self.root) {
            return Err(ConfigError::at("root", e));
        }
        if let Err((k, m)) = self.download.check() {
            return Err(ConfigError::at(&format!("download.{k}"), m));
        }
        if let Err((k, m)) = self.hub.check() {
            return Err(ConfigError::at(&format!("hub.{k}"), m));
        }
        match (&self.classes, &self.class_column) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::at(
                    "class_column",
                    "give either `classes` (columns) or `class_column`, not both",
                ));
            }
            (None, None) => {
                return Err(ConfigError::at("classes", "missing: give `classes: [col, ...]` or `class_column: col`"));
            }
            (Some(c), None) if c.is_empty() => return Err(ConfigError::at("classes", "needs at least one column")),
            _ => {}
        }
        if self.class_separator.is_empty() {
            return Err(ConfigError::at("class_separator", "must not be empty"));
        }
        clean::Cleaner::new(&self.clean).map_err(|(k, m)| ConfigError::at(&format!("clean.{k}"), m))?;
        if self.class_levels == Some(0) {
            return Err(ConfigError::at("class_levels", "must be at least 1"));
        }
        if let Some(t) = &self.text {
            let cols = template_columns(t).map_err(|e| ConfigError::at("text", e))?;
            if cols.is_empty() {
                return Err(ConfigError::at(
                    "text",
                    format!("`{t}` names no column (write e.g. \"{{title}}. {{description}}\")"),
                ));
            }
            // The table's header is cheap to read: name a missing column before anything runs.
            if let Ok(mut r) = csv::ReaderBuilder::new().flexible(true).from_path(self.root.join(&self.table))
                && let Ok(h) = r.headers()
            {
                for c in cols {
                    if !h.iter().any(|x| x == c) {
                        return Err(ConfigError::at(
                            "text",
                            format!("column `{c}` is not in {}{}", self.table, did_you_mean(c, h.iter())),
                        ));
                    }
                }
            }
        }
        let s = &self.split;
        for (k, v) in [("train", s.train), ("val", s.val), ("test", s.test)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(ConfigError::at(&format!("split.{k}"), "must be between 0 and 1"));
            }
        }
        if (s.train + s.val + s.test - 1.0).abs() > 1e-6 {
            return Err(ConfigError::at(
                "split",
                format!("train + val + test must be 1, is {}", s.train + s.val + s.test),
            ));
        }
        if self.min_items_per_class == 0 {
            return Err(ConfigError::at("min_items_per_class", "must be at least 1"));
        }
        Ok(())
    }
}

impl Stage for Ingest {
    fn kind(&self) -> &str {
        "ingest"
    }
    fn version(&self) -> &str {
        "1"
    }
    fn describe(&self) -> &str {
        "product table + images -> items with class paths, stratified split, class tree"
    }
    fn config_schema(&self) -> Option<serde_json::Value> {
        Some(schemars::schema_for!(IngestCfg).to_value())
    }
    fn outputs(&self) -> Vec<Output> {
        vec![Output::new(Artifact::Items, "one item per line"), Output::new(Artifact::Classes, "the class hierarchy")]
    }
    fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        parse_config::<IngestCfg>(config)?.check()
    }
    fn reads(&self, config: &Config) -> Vec<PathBuf> {
        match parse_config::<IngestCfg>(config) {
            // A Hub dataset: the ref file says which commit the revision is.
            Ok(c) => match hub::parse(&c.root) {
                Some(Ok(r)) => hub::refs_path(&r).into_iter().collect(),
                Some(Err(_)) => Vec::new(),
                None => vec![c.root],
            },
            Err(_) => Vec::new(),
        }
    }
    fn run(&self, ctx: &Context, config: &Config, _inputs: &Inputs) -> Result<(), StageError> {
        let cfg: IngestCfg = parse_config(config)?;
        cfg.check()?;
        let out = ingest(&cfg, ctx)?;
        huse_data::write_items(&ctx.out_dir.join(Artifact::Items), &out.items).map_err(StageError::of)?;
        out.tree.write(&ctx.out_dir.join(Artifact::Classes)).map_err(StageError::of)?;
        Ok(())
    }
}

/// What ingest produced.
pub struct Ingested {
    /// The kept items, in file order.
    pub items: Vec<Item>,
    /// The class hierarchy of the kept items.
    pub tree: ClassTree,
    /// Skipped rows by reason.
    pub skipped: BTreeMap<&'static str, usize>,
}

struct Row {
    id: String,
    image: PathBuf,
    text: String,
    path: Vec<String>,
    attrs: BTreeMap<String, String>,
}

/// An item's attribute query: its attribute values (in the order named, unknown ones left
/// out) and its leaf class, lower-cased: `navy blue casual tshirts`.
fn attribute_query(names: &[String], attrs: &BTreeMap<String, String>, path: &[String]) -> String {
    let words = names.iter().filter_map(|n| attrs.get(n)).filter(|v| !v.is_empty()).chain(path.last());
    words.map(|w| w.to_lowercase()).collect::<Vec<_>>().join(" ")
}

/// The `{column}` names of a template, in order.
fn template_columns(template: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        let end = rest[i..].find('}').ok_or_else(|| format!("unclosed `{{` in `{template}`"))?;
        out.push(&rest[i + 1..i + end]);
        rest = &rest[i + end + 1..];
    }
    Ok(out)
}

/// "; did you mean `x`?" for the closest of `names`.
fn did_you_mean<'a>(word: &str, names: impl Iterator<Item = &'a str>) -> String {
    names
        .map(|n| (strsim::jaro_winkler(&word.to_lowercase(), &n.to_lowercase()), n))
        .filter(|(s, _)| *s > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, n)| format!("; did you mean `{n}`?"))
        .unwrap_or_default()
}

/// The text of a row from a template: each `{column}` filled; an empty one drops its part
/// and the literal before it (or after it, for the first), so `"{title}. {description}"`
/// with no description is just the title. Whitespace runs collapse to one space.
pub fn text_from_template(template: &str, get: &dyn Fn(&str) -> Option<String>) -> String {
    let mut lits: Vec<&str> = Vec::new();
    let mut vals: Vec<String> = Vec::new();
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        let Some(end) = rest[i..].find('}') else { break };
        lits.push(&rest[..i]);
        vals.push(get(&rest[i + 1..i + end]).unwrap_or_default().trim().to_string());
        rest = &rest[i + end + 1..];
    }
    let mut out = String::new();
    let mut any = false;
    for (k, v) in vals.iter().enumerate() {
        if v.is_empty() {
            continue;
        }
        // The literal before a kept value: the prefix for the first kept value, the
        // separator before this placeholder otherwise.
        out.push_str(if any { lits[k] } else { lits[0] });
        out.push_str(v);
        any = true;
    }
    if any {
        out.push_str(rest);
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

const EMPTY_LEVEL: &str = "missing class level (an empty level)";

/// A class path from one column's raw value: a JSON list of strings is unwrapped to its
/// first element, then split at `sep`, the last level dropped when `drop_last`, cut or
/// padded to `levels`. `Err` says what is wrong with the value.
pub fn class_path(
    raw: &str,
    sep: &str,
    drop_last: bool,
    levels: Option<usize>,
    pad: ClassPad,
) -> Result<Vec<String>, String> {
    let mut v = raw.trim().to_string();
    if v.starts_with('[')
        && let Ok(list) = serde_json::from_str::<Vec<serde_json::Value>>(&v)
    {
        match list.first() {
            Some(serde_json::Value::String(first)) => v = first.clone(),
            Some(_) => return Err("a JSON list whose first element is not a string".into()),
            None => return Err("an empty JSON list".into()),
        }
    }
    let mut path: Vec<String> = v.split(sep).map(|s| s.trim().to_string()).collect();
    if drop_last {
        if path.len() < 2 {
            return Err(format!("no level left after dropping the item's own name (separator `{sep}`)"));
        }
        path.pop();
    }
    if path.iter().any(String::is_empty) {
        return Err(EMPTY_LEVEL.into());
    }
    if let Some(n) = levels {
        if path.len() < n {
            match pad {
                ClassPad::Drop => return Err(format!("{} level(s), fewer than class_levels {n}", path.len())),
                ClassPad::Repeat => {
                    let last = path.last().cloned().unwrap_or_default();
                    path.resize(n, last);
                }
            }
        }
        path.truncate(n);
    }
    Ok(path)
}

/// Fills `{column}` placeholders of `template` from the row.
fn fill(template: &str, get: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let end = rest[i..].find('}').ok_or_else(|| format!("unclosed `{{` in image template `{template}`"))?;
        let col = &rest[i + 1..i + end];
        out.push_str(&get(col).ok_or_else(|| format!("image template names column `{col}`, which the table lacks"))?);
        rest = &rest[i + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Reads, checks, filters and splits.
pub fn ingest(cfg: &IngestCfg, ctx: &Context) -> Result<Ingested, StageError> {
    // A Hub dataset is first written out as a table + images folder, then read like any other.
    let (root, table_name) = match hub::parse(&cfg.root) {
        Some(r) => {
            let r = r.map_err(|e| StageError::Config(ConfigError::at("root", e)))?;
            let dir = cfg.download.dir.clone().unwrap_or_else(download::default_dir);
            (hub::prepare(&r, &cfg.hub, &dir, ctx)?, "table.csv".to_string())
        }
        None => (cfg.root.clone(), cfg.table.clone()),
    };
    let table = root.join(&table_name);
    let mut rdr = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(&table)
        .map_err(|e| StageError::msg(format!("cannot read table {}: {e}", table.display())))?;
    let headers = rdr.headers().map_err(|e| StageError::msg(format!("{}: {e}", table.display())))?.clone();
    let col = |name: &str, key: &str| -> Result<usize, StageError> {
        headers.iter().position(|h| h == name).ok_or_else(|| {
            StageError::Config(ConfigError::at(
                key,
                format!(
                    "column `{name}` not in {} (columns: {})",
                    table.display(),
                    headers.iter().collect::<Vec<_>>().join(", ")
                ),
            ))
        })
    };
    let cleaner = clean::Cleaner::new(&cfg.clean)
        .map_err(|(k, m)| StageError::Config(ConfigError::at(&format!("clean.{k}"), m)))?;
    let id_col = col(&cfg.id_column, "id_column")?;
    // With a template, its columns must exist; the text is filled per row.
    let text_col = match &cfg.text {
        Some(t) => {
            for c in template_columns(t).map_err(|e| StageError::Config(ConfigError::at("text", e)))? {
                col(c, "text")?;
            }
            None
        }
        None => Some(col(&cfg.text_column, "text_column")?),
    };
    let class_cols: Vec<(usize, String)> = match (&cfg.classes, &cfg.class_column) {
        (Some(cs), _) => cs
            .iter()
            .enumerate()
            .map(|(i, c)| col(c, &format!("classes.{i}")).map(|x| (x, c.clone())))
            .collect::<Result<_, _>>()?,
        (None, Some(c)) => vec![(col(c, "class_column")?, c.clone())],
        _ => unreachable!("checked"),
    };
    let attr_cols: Vec<(usize, String)> = cfg
        .attributes
        .iter()
        .enumerate()
        .map(|(i, c)| col(c, &format!("attributes.{i}")).map(|x| (x, c.clone())))
        .collect::<Result<_, _>>()?;
    let records: Vec<csv::StringRecord> = rdr
        .records()
        .enumerate()
        .map(|(i, r)| r.map_err(|e| StageError::msg(format!("{}: row {}: {e}", table.display(), i + 2))))
        .collect::<Result<_, _>>()?;
    ctx.progress.start("check rows", Some(records.len() as u64), "rows");
    let mut skipped: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut rows: Vec<Row> = Vec::new();
    // The columns the image template names, for messages about a row's image.
    let image_cols = cfg.image.split('{').skip(1).filter_map(|p| p.split('}').next()).collect::<Vec<_>>().join("`, `");
    // Images given as URLs: fetched a chunk of rows ahead, `download.concurrency` at a time.
    let mut downloader: Option<download::Downloader> = None;
    let mut fetched: HashMap<String, Result<PathBuf, String>> = HashMap::new();
    let mut downloaded = 0usize;
    for (i, rec) in records.iter().enumerate() {
        if i % 256 == 0 {
            ctx.cancel.check()?;
            ctx.progress.inc(if i == 0 { 0 } else { 256 });
            if cfg.limit.is_none_or(|l| rows.len() < l) {
                let mut urls: Vec<String> = Vec::new();
                for r in &records[i..(i + 256).min(records.len())] {
                    let get = |c: &str| headers.iter().position(|h| h == c).and_then(|p| r.get(p)).map(str::to_string);
                    if let Ok(v) = fill(&cfg.image, &get)
                        && download::is_url(&v)
                        && !fetched.contains_key(v.trim())
                    {
                        urls.push(v.trim().to_string());
                    }
                }
                urls.sort();
                urls.dedup();
                if !urls.is_empty() {
                    if downloader.is_none() {
                        let d = download::Downloader::new(&cfg.download).map_err(|e| {
                            StageError::msg(format!(
                                "download folder {}: {e}",
                                cfg.download.dir.clone().unwrap_or_else(download::default_dir).display()
                            ))
                        })?;
                        downloader = Some(d);
                    }
                    let d = downloader.as_ref().expect("set above");
                    let got = d.fetch_all(&urls, &|| {}, &|| ctx.cancel.is_cancelled());
                    ctx.cancel.check()?;
                    downloaded += got.len();
                    ctx.progress
                        .message(&format!("{downloaded} image URL(s) fetched or found in {}", d.dir().display()));
                    fetched.extend(got);
                }
            }
        }
        if cfg.limit.is_some_and(|l| rows.len() >= l) {
            break;
        }
        // 1-based line where the record starts (a quoted field may span lines).
        let line = rec.position().map(|p| p.line() as usize).unwrap_or(i + 2);
        let id = rec.get(id_col).unwrap_or("").trim().to_string();
        let bad = |reason: &'static str, column: &str, what: String| -> Result<Option<&'static str>, StageError> {
            match cfg.bad_rows {
                BadRows::Error => Err(StageError::msg(format!(
                    "{}: row {line} (id {id}), column `{column}`: {what} (set `bad_rows: skip` to skip such rows)",
                    table.display()
                ))),
                BadRows::Skip => Ok(Some(reason)),
            }
        };
        let get = |c: &str| headers.iter().position(|h| h == c).and_then(|p| rec.get(p)).map(str::to_string);
        let mut problem: Option<&'static str> = None;
        // A quote left open swallows the rows after it into one field: refuse, naming the
        // line where the quote opened, instead of keeping a title that holds other rows.
        if let Some((c, n)) = swallowed_rows(rec, headers.len(), b',') {
            problem = bad(
                "unterminated_quote",
                headers.get(c).unwrap_or("?"),
                format!(
                    "a quote opened on line {line} runs over {n} line(s) that look like rows of their own (is a closing `\"` missing?)"
                ),
            )?;
        }
        if problem.is_none() && id.chars().any(char::is_control) {
            problem = bad("control_character", &cfg.id_column, format!("the id {id:?} holds a control character"))?;
        }
        let text = match (&cfg.text, text_col) {
            (Some(t), _) => text_from_template(t, &get),
            (None, c) => c.and_then(|c| rec.get(c)).unwrap_or("").trim().to_string(),
        };
        // Control characters (NUL, escapes, line breaks) in text are cleaned like whitespace.
        let text = if text.chars().any(char::is_control) {
            text.split(char::is_control).flat_map(str::split_whitespace).collect::<Vec<_>>().join(" ")
        } else {
            text
        };
        let text = if cleaner.is_identity() { text } else { cleaner.clean(&text) };
        let mut path: Vec<String> = Vec::new();
        if class_cols.len() == 1 && cfg.classes.is_none() {
            let (c, name) = &class_cols[0];
            let raw = rec.get(*c).unwrap_or("");
            if raw.chars().any(char::is_control) {
                if problem.is_none() {
                    problem = bad("control_character", name, format!("class path {raw:?} holds a control character"))?;
                }
            } else {
                match class_path(raw, &cfg.class_separator, cfg.class_drop_last, cfg.class_levels, cfg.class_pad) {
                    Ok(p) => path = p,
                    Err(why) => {
                        let reason = if why == EMPTY_LEVEL { "missing_class" } else { "bad_class_path" };
                        if problem.is_none() {
                            problem = bad(reason, name, format!("class path {raw:?}: {why}"))?;
                        }
                    }
                }
            }
        } else {
            for (c, name) in &class_cols {
                let v = rec.get(*c).unwrap_or("").trim();
                path.push(v.to_string());
                if v.chars().any(char::is_control) && problem.is_none() {
                    problem = bad("control_character", name, format!("class {v:?} holds a control character"))?;
                }
                if path.iter().any(String::is_empty) && problem.is_none() {
                    problem = bad(
                        "missing_class",
                        name,
                        format!("missing class level (path `{}`)", path.join(&cfg.class_separator)),
                    )?;
                }
            }
            if let Some(n) = cfg.class_levels {
                path.truncate(n);
            }
        }
        if problem.is_none() && text.is_empty() {
            problem = bad("empty_text", cfg.text.as_deref().unwrap_or(&cfg.text_column), "empty text".into())?;
        }
        let col_name = &image_cols;
        let image = match fill(&cfg.image, &get) {
            Ok(p) if download::is_url(&p) => match fetched.get(p.trim()) {
                Some(Ok(path)) => path.clone(),
                Some(Err(e)) => {
                    if problem.is_none() {
                        problem = bad("download_failed", col_name, e.clone())?;
                    }
                    PathBuf::new()
                }
                None => return Err(StageError::msg(format!("internal: image URL {p} was not fetched"))),
            },
            Ok(p) => {
                if !cfg.allow_outside_root && problem.is_none() && leaves_root(Path::new(p.trim())) {
                    problem = bad(
                        "image_outside_root",
                        col_name,
                        format!(
                            "image path {p:?} leads outside the dataset root {} (set `allow_outside_root: true` to allow it)",
                            root.display()
                        ),
                    )?;
                }
                root.join(p)
            }
            Err(e) => return Err(StageError::Config(ConfigError::at("image", e))),
        };
        if problem.is_none() {
            if !image.is_file() {
                problem = bad("missing_image", col_name, format!("image {} does not exist", image.display()))?;
            } else if cfg.check_images == CheckImages::Decode
                && let Err(e) = image::ImageReader::open(&image)
                    .and_then(|r| r.with_guessed_format())
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.decode().map_err(|e| e.to_string()))
            {
                problem =
                    bad("undecodable_image", col_name, format!("image {} cannot be decoded: {e}", image.display()))?;
            }
        }
        match problem {
            Some(reason) => *skipped.entry(reason).or_default() += 1,
            None => {
                let attrs = attr_cols
                    .iter()
                    .map(|(c, name)| (name.clone(), rec.get(*c).unwrap_or("").trim().to_string()))
                    .collect();
                rows.push(Row { id, image, text, path, attrs })
            }
        }
    }
    // Per-class cap, then the small-class filter.
    let mut by_class: BTreeMap<Vec<String>, Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        by_class.entry(r.path.clone()).or_default().push(i);
    }
    if let Some(cap) = cfg.per_class_cap {
        by_class.values_mut().for_each(|v| v.truncate(cap));
    }
    let before = by_class.len();
    let dropped: usize = by_class.values().filter(|v| v.len() < cfg.min_items_per_class).map(Vec::len).sum();
    by_class.retain(|_, v| v.len() >= cfg.min_items_per_class);
    if by_class.is_empty() {
        return Err(StageError::msg(format!(
            "no class has at least {} items ({} rows read, {} classes)",
            cfg.min_items_per_class,
            rows.len(),
            before
        )));
    }
    let tree = ClassTree::from_paths(by_class.iter().map(|(p, v)| (p.clone(), v.len())).collect());
    let class_index: HashMap<String, usize> =
        tree.classes.iter().enumerate().map(|(i, c)| (c.name.clone(), i)).collect();
    // Stratified split: shuffle each class with the split seed, cut by the ratios.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.split.seed);
    let mut items = Vec::new();
    for (path, mut idx) in by_class {
        idx.shuffle(&mut rng);
        let n = idx.len();
        let (n_test, n_val) = split_sizes(n, cfg.split.val, cfg.split.test);
        let class = class_index[&path.join("<")];
        for (k, i) in idx.into_iter().enumerate() {
            let split = if k < n_test {
                Split::Test
            } else if k < n_test + n_val {
                Split::Val
            } else {
                Split::Train
            };
            let r = &rows[i];
            let query = (!cfg.attributes.is_empty()).then(|| attribute_query(&cfg.attributes, &r.attrs, &path));
            items.push((
                i,
                Item {
                    id: r.id.clone(),
                    image: r.image.display().to_string(),
                    text: r.text.clone(),
                    class,
                    split,
                    attrs: r.attrs.clone(),
                    query,
                },
            ));
        }
    }
    // Keep the table's order.
    items.sort_by_key(|(i, _)| *i);
    let items: Vec<Item> = items.into_iter().map(|(_, it)| it).collect();
    ctx.metrics.log("data.rows", 0, records.len() as f64);
    ctx.metrics.log("data.items", 0, items.len() as f64);
    ctx.metrics.log("data.classes", 0, tree.classes.len() as f64);
    ctx.metrics.log("data.dropped_small_class_items", 0, dropped as f64);
    for s in [Split::Train, Split::Val, Split::Test] {
        ctx.metrics.log(
            &format!("data.{}", format!("{s:?}").to_lowercase()),
            0,
            items.iter().filter(|i| i.split == s).count() as f64,
        );
    }
    for (reason, n) in &skipped {
        ctx.metrics.log(&format!("data.skipped.{reason}"), 0, *n as f64);
    }
    Ok(Ingested { items, tree, skipped })
}

/// Whether a path from the table leads outside the folder it is relative to: absolute, or
/// climbing with `..` (lexically; links inside the dataset are the dataset's own business).
pub fn leaves_root(p: &Path) -> bool {
    use std::path::Component;
    let mut depth = 0i64;
    for c in p.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => return true,
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
        }
    }
    false
}

/// A field of `rec` that holds whole rows after a line break — the mark of a quote left
/// open: (its column, how many such lines). A line counts as a row when it has at least as
/// many delimiters as a row between its columns (`columns - 1`).
pub fn swallowed_rows(rec: &csv::StringRecord, columns: usize, delimiter: u8) -> Option<(usize, usize)> {
    if columns < 2 {
        return None;
    }
    rec.iter().enumerate().find_map(|(c, field)| {
        if !field.contains(['\n', '\r']) {
            return None;
        }
        let n = field.lines().skip(1).filter(|l| l.bytes().filter(|b| *b == delimiter).count() >= columns - 1).count();
        (n > 0).then_some((c, n))
    })
}

/// (test, val) sizes of a class of `n` items: rounded shares, at least one training item.
pub fn split_sizes(n: usize, val: f64, test: f64) -> (usize, usize) {
    let n_test = ((n as f64) * test).round() as usize;
    let n_val = ((n as f64) * val).round() as usize;
    let n_test = n_test.min(n.saturating_sub(1));
    let n_val = n_val.min(n.saturating_sub(1 + n_test));
    (n_test, n_val)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_fill() {
        let get = |c: &str| (c == "id").then(|| "42".to_string());
        assert_eq!(fill("images/{id}.jpg", &get).unwrap(), "images/42.jpg");
        assert!(fill("images/{nope}.jpg", &get).unwrap_err().contains("`nope`"));
        assert!(fill("images/{id.jpg", &get).is_err());
    }

    #[test]
    fn split_sizes_round_and_keep_a_train_item() {
        assert_eq!(split_sizes(20, 0.1, 0.1), (2, 2));
        assert_eq!(split_sizes(25, 0.1, 0.1), (3, 3));
        assert_eq!(split_sizes(1, 0.5, 0.5), (0, 0));
        assert_eq!(split_sizes(2, 0.5, 0.5), (1, 0));
    }
}
