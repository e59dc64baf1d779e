//! PyTorch checkpoints (`.pth`): both serialisation formats, hash check and resolution.
//!
//! * The zip format (PyTorch >= 1.6) is read with candle's pickle reader.
//! * The LEGACY format (`torch.save(..., _use_new_zipfile_serialization=False)` and every
//!   file written before 1.6, e.g. torchvision's `mobilenet_v2-b0353104.pth`) is a sequence
//!   of pickles — magic number, protocol version, system info, the object itself (tensors
//!   refer to storages by persistent id), the list of storage keys — followed by each
//!   storage's raw bytes, prefixed by its element count as a little-endian `u64`.
//!   candle cannot read it; [`load`] can.
//! * File names like `name-b0353104.pth` carry the first hex digits of the file's SHA-256,
//!   which [`verify_hash_prefix`] checks as torchvision's `check_hash` does.
//! * [`resolve`] finds a checkpoint as PyTorch does: an explicit path, else
//!   `$TORCH_HOME/hub/checkpoints/<file>`.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

/// The magic number pickle that starts a legacy checkpoint (protocol 2, LONG1 of 10 bytes).
const LEGACY_MAGIC: [u8; 15] =
    [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e];

/// Loads every tensor of a checkpoint's state dict (on the CPU), in either format.
pub fn load(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading checkpoint {}", path.display()))?;
    let what = || format!("checkpoint {}", path.display());
    if bytes.starts_with(b"PK\x03\x04") {
        let tensors =
            candle_core::pickle::read_all(path).map_err(|e| anyhow!("{}: zip-format checkpoint: {e}", what()))?;
        ensure!(!tensors.is_empty(), "{}: zip-format checkpoint holds no tensors", what());
        return Ok(tensors.into_iter().collect());
    }
    if bytes.starts_with(&LEGACY_MAGIC) {
        // The pickle reader is third-party code fed with file contents: never let a corrupt
        // file panic the process.
        return std::panic::catch_unwind(|| load_legacy(&bytes))
            .map_err(|_| anyhow!("{}: corrupt legacy checkpoint (the pickle reader failed)", what()))?
            .with_context(what);
    }
    bail!("{}: not a PyTorch checkpoint (neither the zip nor the legacy format)", what())
}

fn read_pickle(cur: &mut Cursor<&[u8]>, what: &str) -> Result<Object> {
    let mut stack = Stack::empty();
    stack.read_loop(cur).map_err(|e| anyhow!("corrupt {what} pickle at byte {}: {e}", cur.position()))?;
    stack.finalize().map_err(|e| anyhow!("corrupt {what} pickle: {e}"))
}

struct StorageRef {
    key: String,
    dtype: DType,
}

fn storage_dtype(class: &str) -> Result<DType> {
    Ok(match class {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "ByteStorage" => DType::U8,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::U32,
        other => bail!("unsupported storage type {other}"),
    })
}

struct TensorRef {
    storage: StorageRef,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

fn usizes(o: Object, what: &str) -> Result<Vec<usize>> {
    match o {
        Object::Tuple(v) => v
            .into_iter()
            .map(|x| {
                x.int_or_long().map(|i| i as usize).map_err(|o| anyhow!("{what}: expected an integer, found {o:?}"))
            })
            .collect(),
        o => bail!("{what}: expected a tuple, found {o:?}"),
    }
}

/// Interprets `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.
fn tensor_ref(value: Object) -> Result<Option<TensorRef>> {
    let Object::Reduce { callable, args } = value else { return Ok(None) };
    let (callable, args) = match *callable {
        Object::Class { module_name, class_name }
            if module_name == "torch._utils" && class_name == "_rebuild_parameter" =>
        {
            let mut a = args.tuple().map_err(|o| anyhow!("bad parameter args {o:?}"))?;
            ensure!(!a.is_empty(), "empty parameter args");
            match a.remove(0) {
                Object::Reduce { callable, args } => (*callable, *args),
                _ => return Ok(None),
            }
        }
        c => (c, *args),
    };
    match &callable {
        Object::Class { module_name, class_name }
            if module_name == "torch._utils" && class_name == "_rebuild_tensor_v2" => {}
        _ => return Ok(None),
    }
    let mut a = args.tuple().map_err(|o| anyhow!("bad tensor args {o:?}"))?;
    ensure!(a.len() >= 4, "tensor args too short");
    let stride = usizes(a.remove(3), "stride")?;
    let size = usizes(a.remove(2), "size")?;
    let offset = a.remove(1).int_or_long().map_err(|o| anyhow!("bad storage offset {o:?}"))? as usize;
    let pid = a.remove(0).persistent_load().map_err(|o| anyhow!("expected a storage reference, found {o:?}"))?;
    let mut t = pid.tuple().map_err(|o| anyhow!("bad storage reference {o:?}"))?;
    ensure!(t.len() >= 5, "storage reference too short");
    let key = t.remove(2).unicode().map_err(|o| anyhow!("bad storage key {o:?}"))?;
    let (_, class) = t.remove(1).class().map_err(|o| anyhow!("bad storage type {o:?}"))?;
    Ok(Some(TensorRef { storage: StorageRef { key, dtype: storage_dtype(&class)? }, offset, size, stride }))
}

fn load_legacy(bytes: &[u8]) -> Result<HashMap<String, Tensor>> {
    let mut cur = Cursor::new(bytes);
    cur.set_position(LEGACY_MAGIC.len() as u64);
    let proto = read_pickle(&mut cur, "protocol version")?;
    ensure!(matches!(proto, Object::Int(1001)), "unsupported legacy protocol version {proto:?}");
    let _sys_info = read_pickle(&mut cur, "system info")?;
    let obj = read_pickle(&mut cur, "state dict")?;
    let keys = match read_pickle(&mut cur, "storage keys")? {
        Object::List(v) => v
            .into_iter()
            .map(|k| k.unicode().map_err(|o| anyhow!("bad storage key {o:?}")))
            .collect::<Result<Vec<_>>>()?,
        o => bail!("expected the list of storage keys, found {o:?}"),
    };
    // The state dict: an OrderedDict, possibly wrapped in BUILD (its `_metadata`).
    let items = match obj {
        Object::Dict(items) => items,
        Object::Build { callable, .. } => match *callable {
            Object::Dict(items) => items,
            o => bail!("expected a state dict, found {o:?}"),
        },
        o => bail!("expected a state dict, found {o:?}"),
    };
    // Locate every storage's bytes.
    let mut storages: HashMap<String, (usize, usize)> = HashMap::new();
    let mut pos = cur.position() as usize;
    let refs: Vec<(String, TensorRef)> = items
        .into_iter()
        .filter_map(|(k, v)| match (k.unicode(), tensor_ref(v)) {
            (Ok(name), Ok(Some(r))) => Some(Ok((name, r))),
            (_, Err(e)) => Some(Err(e)),
            _ => None,
        })
        .collect::<Result<_>>()?;
    let elsize: HashMap<&str, usize> =
        refs.iter().map(|(_, r)| (r.storage.key.as_str(), r.storage.dtype.size_in_bytes())).collect();
    for key in &keys {
        let mut n = [0u8; 8];
        (&bytes[pos.min(bytes.len())..]).read_exact(&mut n).map_err(|_| {
            anyhow!("truncated: storage {key} has no size header at byte {pos} (file is {} bytes)", bytes.len())
        })?;
        let numel = u64::from_le_bytes(n) as usize;
        let es = *elsize.get(key.as_str()).unwrap_or(&1);
        let start = pos + 8;
        let len = numel.checked_mul(es).ok_or_else(|| anyhow!("storage {key}: absurd size {numel}"))?;
        ensure!(
            start + len <= bytes.len(),
            "truncated: storage {key} needs {len} bytes at byte {start}, but the file has only {} bytes",
            bytes.len()
        );
        storages.insert(key.clone(), (start, numel));
        pos = start + len;
    }
    let mut out = HashMap::new();
    for (name, r) in refs {
        let (start, numel) =
            *storages.get(&r.storage.key).ok_or_else(|| anyhow!("{name}: storage {} is missing", r.storage.key))?;
        let es = r.storage.dtype.size_in_bytes();
        let count: usize = r.size.iter().product();
        let max_index = r.offset + r.size.iter().zip(&r.stride).map(|(s, st)| s.saturating_sub(1) * st).sum::<usize>();
        ensure!(count == 0 || max_index < numel, "{name}: view exceeds its storage ({max_index} >= {numel})");
        let storage = &bytes[start..start + numel * es];
        let contiguous = {
            let mut expect = 1;
            r.size.iter().zip(&r.stride).rev().all(|(s, st)| {
                let ok = *s == 1 || *st == expect;
                expect *= s;
                ok
            })
        };
        let data: Vec<u8> = if contiguous {
            storage[r.offset * es..(r.offset + count) * es].to_vec()
        } else {
            let mut v = Vec::with_capacity(count * es);
            let mut idx = vec![0usize; r.size.len()];
            for _ in 0..count {
                let at = r.offset + idx.iter().zip(&r.stride).map(|(i, s)| i * s).sum::<usize>();
                v.extend_from_slice(&storage[at * es..(at + 1) * es]);
                for d in (0..idx.len()).rev() {
                    idx[d] += 1;
                    if idx[d] < r.size[d] {
                        break;
                    }
                    idx[d] = 0;
                }
            }
            v
        };
        let t = Tensor::from_raw_buffer(&data, r.storage.dtype, &r.size, &Device::Cpu)?;
        out.insert(name, t);
    }
    ensure!(!out.is_empty(), "the checkpoint holds no tensors");
    Ok(out)
}

/// Checks a torchvision-style hash prefix (`name-<hex>.pth`) against the file's SHA-256.
/// Files without such a suffix pass unchecked (returns `Ok(false)`).
pub fn verify_hash_prefix(path: &Path) -> Result<bool> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let stem = name.split('.').next().unwrap_or("");
    let has = stem.rsplit_once('-').is_some_and(|(_, h)| h.len() >= 6 && h.chars().all(|c| c.is_ascii_hexdigit()));
    if !has {
        return Ok(false);
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    verify_bytes(&bytes, path)
        .map_err(|e| anyhow!("checkpoint {} is corrupt or not the file its name promises: {e}", path.display()))?;
    Ok(true)
}

/// Finds a checkpoint as PyTorch's `load_state_dict_from_url` does: `explicit` if given,
/// else `$TORCH_HOME/hub/checkpoints/<file name of url>` (TORCH_HOME defaulting to
/// `~/.cache/torch`), downloading it there from `url` when missing — unless
/// `HUSE_OFFLINE` is set. A download is written to `<file>.partial`, checked against the
/// hash prefix in its name, then renamed into place.
pub fn resolve(explicit: Option<&Path>, url: &str) -> Result<PathBuf> {
    if let Some(p) = explicit {
        ensure!(p.is_file(), "checkpoint {} does not exist", p.display());
        return Ok(p.to_path_buf());
    }
    let file = url.rsplit('/').next().unwrap_or(url);
    let home = std::env::var_os("TORCH_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/torch")))
        .ok_or_else(|| anyhow!("neither TORCH_HOME nor HOME is set"))?;
    let p = home.join("hub").join("checkpoints").join(file);
    if p.is_file() {
        return Ok(p);
    }
    let how = format!(
        "put {file} into {} (or set TORCH_HOME to a folder holding hub/checkpoints/{file}), or give the path explicitly",
        p.parent().unwrap().display()
    );
    if std::env::var("HUSE_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0") {
        bail!("checkpoint {file} not found at {} and HUSE_OFFLINE is set: {how}", p.display());
    }
    download(url, &p).map_err(|e| {
        anyhow!("checkpoint {file} not found at {} and downloading {url} failed: {e:#}. {how}", p.display())
    })?;
    Ok(p)
}

fn download(url: &str, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest.parent().unwrap())?;
    let partial = dest.with_extension("pth.partial");
    let mut resp = ureq::get(url).call().map_err(|e| anyhow!("{e}"))?;
    let mut f = std::fs::File::create(&partial)?;
    std::io::copy(&mut resp.body_mut().as_reader(), &mut f)?;
    drop(f);
    // Check the hash the name promises before the file takes the final name.
    if let Err(e) = verify_bytes(&std::fs::read(&partial)?, dest) {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, dest)?;
    Ok(())
}

fn verify_bytes(bytes: &[u8], named: &Path) -> Result<()> {
    let name = named.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let stem = name.split('.').next().unwrap_or("");
    if let Some(prefix) =
        stem.rsplit_once('-').map(|(_, h)| h).filter(|h| h.len() >= 6 && h.chars().all(|c| c.is_ascii_hexdigit()))
    {
        let digest: String = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
        ensure!(
            digest.starts_with(&prefix.to_lowercase()),
            "the download's SHA-256 {digest} does not start with `{prefix}`"
        );
    }
    Ok(())
}
