//! The C ABI between `huse-run` and stage plugins (shared libraries loaded at run time),
//! and [`export_stages!`], which exposes ordinary Rust [`Stage`]s through it in one line.
//!
//! Rust's own ABI is unstable, so nothing Rust-specific crosses the boundary:
//!
//! * the library exports one symbol, [`ENTRY_SYMBOL`] (`huse_plugin_entry`), returning a
//!   pointer to a `#[repr(C)]` [`PluginTable`] whose first field is the ABI version; the
//!   host checks it before touching anything else;
//! * configs, artifact lists and errors cross as NUL-terminated UTF-8 (JSON where
//!   structured), paths as strings; callbacks for metrics, progress and cancellation are
//!   `extern "C"` functions with an opaque host pointer;
//! * a string the plugin returns is allocated by the plugin and given back to its
//!   [`PluginTable::free_string`]; strings the host passes stay the host's;
//! * every entry point catches panics inside the plugin and reports them as errors.
//!
//! ```ignore
//! // In a `cdylib` crate depending on huse-plugin and huse-stage-api:
//! huse_plugin::export_stages!(env!("CARGO_PKG_VERSION"), [MyStage]);
//! ```

use std::ffi::{CStr, CString, c_char, c_void};
use std::path::{Path, PathBuf};

use huse_stage_api::{
    CancelToken, Config, ConfigError, Context, DeviceSpec, Inputs, MetricLogger, Progress, Stage, StageError,
};

/// Version of this ABI; a plugin built against another version is refused.
pub const ABI_VERSION: u32 = 2;
/// The symbol every plugin exports.
pub const ENTRY_SYMBOL: &[u8] = b"huse_plugin_entry";
/// The error string a `run` returns when the stage was cancelled.
pub const CANCELLED: &str = "\u{1}cancelled";

/// What `huse_plugin_entry` returns.
#[repr(C)]
pub struct PluginTable {
    /// [`ABI_VERSION`] of the plugin's build. Checked first.
    pub abi_version: u32,
    /// The plugin's own version (NUL-terminated, static).
    pub plugin_version: *const c_char,
    /// Number of stage kinds in `stages`.
    pub n_stages: usize,
    /// The stage kinds (`n_stages` of them).
    pub stages: *const StageVTable,
    /// Frees a string this plugin returned.
    pub free_string: extern "C" fn(*mut c_char),
}

/// One stage kind of a plugin. Static strings are NUL-terminated and live as long as the library.
#[repr(C)]
pub struct StageVTable {
    /// The kind `uses:` names.
    pub kind: *const c_char,
    /// The stage's version (part of its cache key).
    pub version: *const c_char,
    /// A one-line description.
    pub describe: *const c_char,
    /// JSON `[{"name": .., "required": .., "many": ..}]`.
    pub inputs_json: *const c_char,
    /// JSON `[{"name": .., "about": .., "summary": .., "attachment": ..}]` (the flags may be
    /// absent: false; added within ABI version 1, so older plugins still load).
    pub outputs_json: *const c_char,
    /// Whether the stage's outputs depend on the run's seed (part of its cache key).
    pub uses_seed: bool,
    /// Config JSON in; null when valid, else JSON `{"path": [..], "message": ..}` (plugin-owned).
    pub validate: extern "C" fn(stage: usize, config_json: *const c_char) -> *mut c_char,
    /// Config JSON in; JSON list of paths out (plugin-owned).
    pub reads: extern "C" fn(stage: usize, config_json: *const c_char) -> *mut c_char,
    /// Runs; null on success, else the error message (plugin-owned), [`CANCELLED`] when cancelled.
    pub run: extern "C" fn(stage: usize, ctx: *const RunContext) -> *mut c_char,
}

/// The context of one `run` call; every pointer is the host's and valid during the call.
#[repr(C)]
pub struct RunContext {
    /// The stage's name in the experiment.
    pub name: *const c_char,
    /// Its config (the `with:` block) as JSON.
    pub config_json: *const c_char,
    /// JSON `{"artifact": [["stage", "path"], ..]}`.
    pub inputs_json: *const c_char,
    /// The folder its outputs go to.
    pub out_dir: *const c_char,
    /// A folder of its own that survives interruptions (checkpoints).
    pub work_dir: *const c_char,
    /// `auto`, `cpu` or `cuda:N`.
    pub device: *const c_char,
    /// The run's seed.
    pub seed: u64,
    /// The host's handle: pass it back to the callbacks.
    pub host: *const c_void,
    /// Logs a metric value at a step.
    pub log_metric: extern "C" fn(host: *const c_void, key: *const c_char, step: i64, value: f64),
    /// `total` < 0: unknown.
    pub progress_start: extern "C" fn(host: *const c_void, phase: *const c_char, total: i64, unit: *const c_char),
    /// Advances the progress bar by `n`.
    pub progress_inc: extern "C" fn(host: *const c_void, n: u64),
    /// Sets the progress bar's message.
    pub progress_message: extern "C" fn(host: *const c_void, msg: *const c_char),
    /// True once the run is cancelled (Ctrl-C): stop and return [`CANCELLED`].
    pub is_cancelled: extern "C" fn(host: *const c_void) -> bool,
    /// The stage's thread budget (ABI 2): the plugin runs the stage in a rayon pool of its
    /// own of this size (the plugin's rayon is not the host's).
    pub threads: usize,
}

// SAFETY: by contract the host's callbacks and `host` object may be used from any thread
// (the host implements them over thread-safe types), and the strings are read-only.
unsafe impl Sync for RunContext {}
unsafe impl Send for RunContext {}

/// Reads a NUL-terminated string (lossy UTF-8). Null reads as "".
///
/// # Safety
/// `p` is null or points to a NUL-terminated string valid for the call.
pub unsafe fn read_str(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// A plugin-owned string for the host (interior NULs replaced).
pub fn owned(s: &str) -> *mut c_char {
    CString::new(s.replace('\0', " ")).unwrap_or_default().into_raw()
}

/// Frees a string made by [`owned`]. Used as the plugin's `free_string`.
#[allow(
    clippy::not_unsafe_ptr_arg_deref,
    reason = "a C-ABI entry point: the pointers come from the host, which the ABI obliges to pass valid NUL-terminated strings and a live RunContext; the `extern \"C\"` wrappers export_stages! generates cannot be `unsafe fn`"
)]
pub extern "C" fn free_string(p: *mut c_char) {
    if !p.is_null() {
        drop(unsafe { CString::from_raw(p) });
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Plugin side of `validate`, for [`export_stages!`].
#[allow(
    clippy::not_unsafe_ptr_arg_deref,
    reason = "a C-ABI entry point: the pointers come from the host, which the ABI obliges to pass valid NUL-terminated strings and a live RunContext; the `extern \"C\"` wrappers export_stages! generates cannot be `unsafe fn`"
)]
pub fn plugin_validate(stage: &dyn Stage, config_json: *const c_char) -> *mut c_char {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let config: Config = serde_json::from_str(&unsafe { read_str(config_json) }).unwrap_or(Config::Null);
        stage.validate(&config)
    }));
    match r {
        Ok(Ok(())) => std::ptr::null_mut(),
        Ok(Err(e)) => owned(&serde_json::json!({"path": e.path, "message": e.message}).to_string()),
        Err(p) => owned(&serde_json::json!({"path": [], "message": format!("plugin panicked while validating: {}", panic_message(p))}).to_string()),
    }
}

/// Plugin side of `reads`, for [`export_stages!`].
#[allow(
    clippy::not_unsafe_ptr_arg_deref,
    reason = "a C-ABI entry point: the pointers come from the host, which the ABI obliges to pass valid NUL-terminated strings and a live RunContext; the `extern \"C\"` wrappers export_stages! generates cannot be `unsafe fn`"
)]
pub fn plugin_reads(stage: &dyn Stage, config_json: *const c_char) -> *mut c_char {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let config: Config = serde_json::from_str(&unsafe { read_str(config_json) }).unwrap_or(Config::Null);
        stage.reads(&config)
    }));
    let paths: Vec<String> = r.unwrap_or_default().iter().map(|p| p.display().to_string()).collect();
    owned(&serde_json::to_string(&paths).unwrap_or_else(|_| "[]".into()))
}

struct Callbacks<'a>(&'a RunContext);

impl Progress for Callbacks<'_> {
    fn start(&self, phase: &str, total: Option<u64>, unit: &str) {
        let (p, u) = (CString::new(phase).unwrap_or_default(), CString::new(unit).unwrap_or_default());
        (self.0.progress_start)(self.0.host, p.as_ptr(), total.map(|t| t as i64).unwrap_or(-1), u.as_ptr());
    }
    fn inc(&self, n: u64) {
        (self.0.progress_inc)(self.0.host, n);
    }
    fn message(&self, msg: &str) {
        let m = CString::new(msg).unwrap_or_default();
        (self.0.progress_message)(self.0.host, m.as_ptr());
    }
}

impl MetricLogger for Callbacks<'_> {
    fn log(&self, key: &str, step: i64, value: f64) {
        let k = CString::new(key).unwrap_or_default();
        (self.0.log_metric)(self.0.host, k.as_ptr(), step, value);
    }
}

/// Plugin side of `run`, for [`export_stages!`]: rebuilds a [`Context`] whose progress,
/// metrics and cancellation call back into the host.
#[allow(
    clippy::not_unsafe_ptr_arg_deref,
    reason = "a C-ABI entry point: the pointers come from the host, which the ABI obliges to pass valid NUL-terminated strings and a live RunContext; the `extern \"C\"` wrappers export_stages! generates cannot be `unsafe fn`"
)]
pub fn plugin_run(stage: &dyn Stage, ctx: *const RunContext) -> *mut c_char {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<(), StageError> {
        let c = unsafe { &*ctx };
        let config: Config = serde_json::from_str(&unsafe { read_str(c.config_json) })
            .map_err(|e| StageError::msg(format!("bad config JSON from the host: {e}")))?;
        let raw: std::collections::BTreeMap<String, Vec<(String, String)>> =
            serde_json::from_str(&unsafe { read_str(c.inputs_json) })
                .map_err(|e| StageError::msg(format!("bad inputs JSON from the host: {e}")))?;
        let mut inputs = Inputs::default();
        for (artifact, list) in raw {
            for (st, path) in list {
                inputs.insert(&artifact, &st, PathBuf::from(path));
            }
        }
        let (out_dir, work_dir, name) = unsafe { (read_str(c.out_dir), read_str(c.work_dir), read_str(c.name)) };
        let device: DeviceSpec = unsafe { read_str(c.device) }.parse().unwrap_or(DeviceSpec::Cpu);
        let cb = Callbacks(c);
        // Cancellation: a token polled from the host by a watcher thread for the call's duration.
        let cancel = CancelToken::new();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    if (c.is_cancelled)(c.host) {
                        cancel.cancel();
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            });
            let ctx = Context {
                name: &name,
                device,
                seed: c.seed,
                out_dir: Path::new(&out_dir),
                work_dir: Path::new(&work_dir),
                progress: &cb,
                metrics: &cb,
                cancel: &cancel,
                threads: c.threads.max(1),
            };
            // Stops the watcher however `run` ends, a panic included.
            struct Done<'a>(&'a std::sync::atomic::AtomicBool);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
            let _done = Done(&done);
            huse_stage_api::with_threads(ctx.threads, || stage.run(&ctx, &config, &inputs))?
        })
    }));
    match r {
        Ok(Ok(())) => std::ptr::null_mut(),
        Ok(Err(StageError::Cancelled)) => owned(CANCELLED),
        Ok(Err(e)) => owned(&e.to_string()),
        Err(p) => owned(&format!("plugin panicked: {}", panic_message(p))),
    }
}

/// JSON of a stage's inputs and outputs, for the vtable.
pub fn ports_json(stage: &dyn Stage) -> (CString, CString) {
    let i: Vec<_> = stage
        .inputs()
        .iter()
        .map(|i| serde_json::json!({"name": i.name, "required": i.required, "many": i.many}))
        .collect();
    let o: Vec<_> = stage
        .outputs()
        .iter()
        .map(
            |o| serde_json::json!({"name": o.name, "about": o.about, "summary": o.summary, "attachment": o.attachment}),
        )
        .collect();
    (
        CString::new(serde_json::to_string(&i).unwrap()).unwrap(),
        CString::new(serde_json::to_string(&o).unwrap()).unwrap(),
    )
}

/// Builds the static table of a plugin from its stages. Used by [`export_stages!`].
pub fn build_table(
    version: &'static str,
    stages: &'static [&'static dyn Stage],
    validate: extern "C" fn(usize, *const c_char) -> *mut c_char,
    reads: extern "C" fn(usize, *const c_char) -> *mut c_char,
    run: extern "C" fn(usize, *const RunContext) -> *mut c_char,
) -> PluginTable {
    let leak = |s: &str| CString::new(s).unwrap_or_default().into_raw() as *const c_char;
    let vt: Vec<StageVTable> = stages
        .iter()
        .map(|s| {
            let (i, o) = ports_json(*s);
            StageVTable {
                kind: leak(s.kind()),
                version: leak(s.version()),
                describe: leak(s.describe()),
                inputs_json: i.into_raw(),
                outputs_json: o.into_raw(),
                uses_seed: s.uses_seed(),
                validate,
                reads,
                run,
            }
        })
        .collect();
    let vt = Box::leak(vt.into_boxed_slice());
    PluginTable {
        abi_version: ABI_VERSION,
        plugin_version: leak(version),
        n_stages: vt.len(),
        stages: vt.as_ptr(),
        free_string,
    }
}

/// Exports stages from a `cdylib`: `export_stages!(version, [StageA, StageB])`, where each
/// stage is a unit-struct value (or any `'static` constant) implementing `Stage`.
#[macro_export]
macro_rules! export_stages {
    ($version:expr, [$($stage:expr),+ $(,)?]) => {
        static __HUSE_STAGES: &[&'static (dyn $crate::__Stage)] = &[$(&$stage),+];
        extern "C" fn __huse_validate(i: usize, c: *const ::std::ffi::c_char) -> *mut ::std::ffi::c_char {
            $crate::plugin_validate(__HUSE_STAGES[i], c)
        }
        extern "C" fn __huse_reads(i: usize, c: *const ::std::ffi::c_char) -> *mut ::std::ffi::c_char {
            $crate::plugin_reads(__HUSE_STAGES[i], c)
        }
        extern "C" fn __huse_run(i: usize, c: *const $crate::RunContext) -> *mut ::std::ffi::c_char {
            $crate::plugin_run(__HUSE_STAGES[i], c)
        }
        /// The plugin's entry point.
        #[unsafe(no_mangle)]
        pub extern "C" fn huse_plugin_entry() -> *const $crate::PluginTable {
            static TABLE: ::std::sync::OnceLock<$crate::SendTable> = ::std::sync::OnceLock::new();
            match ::std::panic::catch_unwind(|| {
                TABLE.get_or_init(|| $crate::SendTable($crate::build_table($version, __HUSE_STAGES, __huse_validate, __huse_reads, __huse_run))).as_ptr()
            }) {
                Ok(p) => p,
                Err(_) => ::std::ptr::null(),
            }
        }
    };
}

#[doc(hidden)]
pub use huse_stage_api::Stage as __Stage;

/// A table shared across threads (its pointers are to leaked, immutable data).
#[doc(hidden)]
pub struct SendTable(pub PluginTable);
unsafe impl Send for SendTable {}
unsafe impl Sync for SendTable {}
impl SendTable {
    pub fn as_ptr(&self) -> *const PluginTable {
        &self.0
    }
}

/// Turns a validation result string (see [`StageVTable::validate`]) back into a [`ConfigError`].
pub fn config_error_from_json(s: &str) -> ConfigError {
    let v: serde_json::Value = serde_json::from_str(s).unwrap_or_default();
    ConfigError {
        path: v["path"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
            .unwrap_or_default(),
        message: v["message"].as_str().unwrap_or(s).to_string(),
    }
}
