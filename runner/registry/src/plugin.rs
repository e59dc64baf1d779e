//! Loading stage plugins: shared libraries that speak the `huse-plugin` C ABI.
//!
//! Plugins come only from the experiment's `plugins:` list and `--plugin PATH`. A library is
//! opened with libloading, its `huse_plugin_entry` symbol called, and the ABI version in
//! the returned table checked before anything else is read. Each stage kind it offers
//! becomes a [`PluginStage`] in the registry, with source `plugin:<path>@<version>` — which
//! enters every cache key and the `stage_runs.source` column. Libraries stay loaded for the
//! life of the process.

use std::ffi::{CString, c_char, c_void};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use huse_plugin::{ABI_VERSION, CANCELLED, ENTRY_SYMBOL, PluginTable, RunContext, StageVTable, read_str};
use huse_stage_api::{
    CancelToken, Config, ConfigError, Context, Input, Inputs, MetricLogger, Output, Progress, Stage, StageError,
};

/// One stage kind of a loaded plugin.
pub struct PluginStage {
    table: &'static PluginTable,
    index: usize,
    kind: String,
    version: String,
    describe: String,
    inputs: Vec<Input>,
    outputs: Vec<Output>,
    uses_seed: bool,
}

// SAFETY: the table and its strings are immutable static data of a library that is never
// unloaded; the plugin's entry points are required to be thread-safe.
unsafe impl Send for PluginStage {}
unsafe impl Sync for PluginStage {}

impl PluginStage {
    fn vt(&self) -> &StageVTable {
        // SAFETY: index < n_stages, checked at load.
        unsafe { &*self.table.stages.add(self.index) }
    }

    /// Takes a plugin-owned string and frees it with the plugin's allocator.
    fn take(&self, p: *mut c_char) -> Option<String> {
        if p.is_null() {
            return None;
        }
        let s = unsafe { read_str(p) };
        (self.table.free_string)(p);
        Some(s)
    }
}

fn cstr(s: &str) -> CString {
    CString::new(s.replace('\0', " ")).unwrap_or_default()
}

/// What the plugin's callbacks reach: the stage context's progress, metrics and cancellation.
struct Host<'a> {
    progress: &'a dyn Progress,
    metrics: &'a dyn MetricLogger,
    cancel: &'a CancelToken,
}

extern "C" fn cb_metric(host: *const c_void, key: *const c_char, step: i64, value: f64) {
    let h = unsafe { &*(host as *const Host) };
    h.metrics.log(&unsafe { read_str(key) }, step, value);
}
extern "C" fn cb_start(host: *const c_void, phase: *const c_char, total: i64, unit: *const c_char) {
    let h = unsafe { &*(host as *const Host) };
    h.progress.start(&unsafe { read_str(phase) }, (total >= 0).then_some(total as u64), &unsafe { read_str(unit) });
}
extern "C" fn cb_inc(host: *const c_void, n: u64) {
    unsafe { &*(host as *const Host) }.progress.inc(n);
}
extern "C" fn cb_message(host: *const c_void, msg: *const c_char) {
    let h = unsafe { &*(host as *const Host) };
    h.progress.message(&unsafe { read_str(msg) });
}
extern "C" fn cb_cancelled(host: *const c_void) -> bool {
    unsafe { &*(host as *const Host) }.cancel.is_cancelled()
}

impl Stage for PluginStage {
    fn kind(&self) -> &str {
        &self.kind
    }
    fn version(&self) -> &str {
        &self.version
    }
    fn describe(&self) -> &str {
        &self.describe
    }
    fn inputs(&self) -> Vec<Input> {
        self.inputs.clone()
    }
    fn outputs(&self) -> Vec<Output> {
        self.outputs.clone()
    }
    fn uses_seed(&self) -> bool {
        self.uses_seed
    }
    fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        let c = cstr(&config.to_string());
        match self.take((self.vt().validate)(self.index, c.as_ptr())) {
            None => Ok(()),
            Some(json) => Err(huse_plugin::config_error_from_json(&json)),
        }
    }
    fn reads(&self, config: &Config) -> Vec<PathBuf> {
        let c = cstr(&config.to_string());
        let json = self.take((self.vt().reads)(self.index, c.as_ptr())).unwrap_or_default();
        serde_json::from_str::<Vec<String>>(&json).unwrap_or_default().into_iter().map(PathBuf::from).collect()
    }
    fn run(&self, ctx: &Context, config: &Config, inputs: &Inputs) -> Result<(), StageError> {
        let mut map: std::collections::BTreeMap<&str, Vec<(String, String)>> = Default::default();
        for (artifact, stage, path) in inputs.iter() {
            map.entry(artifact).or_default().push((stage.to_string(), path.display().to_string()));
        }
        let strings = [
            cstr(ctx.name),
            cstr(&config.to_string()),
            cstr(&serde_json::to_string(&map).unwrap_or_default()),
            cstr(&ctx.out_dir.display().to_string()),
            cstr(&ctx.work_dir.display().to_string()),
            cstr(&ctx.device.to_string()),
        ];
        let host = Host { progress: ctx.progress, metrics: ctx.metrics, cancel: ctx.cancel };
        let rc = RunContext {
            name: strings[0].as_ptr(),
            config_json: strings[1].as_ptr(),
            inputs_json: strings[2].as_ptr(),
            out_dir: strings[3].as_ptr(),
            work_dir: strings[4].as_ptr(),
            device: strings[5].as_ptr(),
            seed: ctx.seed,
            host: &host as *const Host as *const c_void,
            log_metric: cb_metric,
            progress_start: cb_start,
            progress_inc: cb_inc,
            progress_message: cb_message,
            is_cancelled: cb_cancelled,
            threads: ctx.threads,
        };
        match self.take((self.vt().run)(self.index, &rc)) {
            None => Ok(()),
            Some(e) if e == CANCELLED => Err(StageError::Cancelled),
            Some(e) => Err(StageError::msg(format!("plugin {}: {e}", self.kind))),
        }
    }
}

/// Opens the plugin at `path` and returns its stages with their registry source
/// (`plugin:<path>@<version>`).
pub fn load(path: &Path) -> Result<(Vec<Arc<dyn Stage>>, String), String> {
    let shown = path.display();
    if !path.is_file() {
        return Err(format!("plugin {shown} does not exist"));
    }
    // SAFETY: loading a library runs its initialisers; plugins are trusted code named by the user.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| {
        // libloading's own text is only "dlopen failed"; the loader's message (a missing
        // dependency, a wrong architecture) is its source.
        let mut why = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            why = format!("{why}: {c}");
            cause = c.source();
        }
        format!("plugin {shown} is not a loadable shared library: {why}")
    })?;
    let lib: &'static libloading::Library = Box::leak(Box::new(lib));
    let entry = unsafe { lib.get::<extern "C" fn() -> *const PluginTable>(ENTRY_SYMBOL) }.map_err(|_| {
        format!("plugin {shown} has no `{}` symbol: it is not a huse-run plugin (export one with huse_plugin::export_stages!)", String::from_utf8_lossy(ENTRY_SYMBOL))
    })?;
    let table = entry();
    if table.is_null() {
        return Err(format!("plugin {shown}: its entry point failed (returned no table)"));
    }
    // SAFETY: non-null pointer to a static table; only the first field is read before the version check.
    let abi = unsafe { std::ptr::read(table as *const u32) };
    if abi != ABI_VERSION {
        return Err(format!(
            "plugin {shown} was built for plugin ABI version {abi}, this huse-run speaks version {ABI_VERSION}: rebuild it against huse-plugin {}",
            env!("CARGO_PKG_VERSION")
        ));
    }
    let table: &'static PluginTable = unsafe { &*table };
    let version = unsafe { read_str(table.plugin_version) };
    let source = format!("plugin:{}@{version}", std::fs::canonicalize(path).unwrap_or(path.to_path_buf()).display());
    let mut stages: Vec<Arc<dyn Stage>> = Vec::new();
    for index in 0..table.n_stages {
        let vt = unsafe { &*table.stages.add(index) };
        let s = |p| unsafe { read_str(p) };
        let inputs: Vec<serde_json::Value> = serde_json::from_str(&s(vt.inputs_json))
            .map_err(|e| format!("plugin {shown}: bad inputs of stage {index}: {e}"))?;
        let outputs: Vec<serde_json::Value> = serde_json::from_str(&s(vt.outputs_json))
            .map_err(|e| format!("plugin {shown}: bad outputs of stage {index}: {e}"))?;
        stages.push(Arc::new(PluginStage {
            table,
            index,
            kind: s(vt.kind),
            version: s(vt.version),
            describe: s(vt.describe),
            inputs: inputs
                .iter()
                .map(|v| Input {
                    name: v["name"].as_str().unwrap_or("").into(),
                    required: v["required"].as_bool().unwrap_or(true),
                    many: v["many"].as_bool().unwrap_or(false),
                })
                .collect(),
            outputs: outputs
                .iter()
                .map(|v| {
                    let (name, about) = (v["name"].as_str().unwrap_or(""), v["about"].as_str().unwrap_or(""));
                    let mut o = Output::new(name, about);
                    o.summary = v["summary"].as_bool().unwrap_or(false);
                    o.attachment = v["attachment"].as_bool().unwrap_or(false);
                    o
                })
                .collect(),
            uses_seed: vt.uses_seed,
        }));
    }
    if stages.is_empty() {
        return Err(format!("plugin {shown} offers no stage"));
    }
    Ok((stages, source))
}
