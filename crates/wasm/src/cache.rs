//! Compiled modules and components: in memory (ready-to-instantiate [`Program`]s) and on
//! disk (`.cwasm`, whose header says which of the two it holds).
//!
//! The key is the SHA-256 of the module's bytes plus a hash of everything in the engine that
//! changes the machine code (target, Cranelift flags, tunables, features, wasmtime version:
//! [`Engine::precompile_compatibility_hash`]), so a cache directory survives upgrades and
//! config changes without ever handing an engine code it cannot run.
//!
//! Two creates of the same new module at once both compile it; the second rename wins.
//!
//! Both caches are bounded, so a node that runs a new module per sandbox (an agent's
//! generated code) does not grow without end: memory keeps the `cache_modules` most recently
//! used programs, the disk the most recently used files up to `cache_max_bytes` (a file's
//! mtime is its last use; trimmed after each compile, the file just written kept even if it
//! alone is larger). An evicted program still running stays alive with its instances.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};
use warren_image::{FileIdentity, ImageError, ImageStore};
use wasmtime::component::Component;
use wasmtime::{Engine, ExternType, Module, Precompiled};
use wasmtime_wasi::p2::bindings::CommandPre;

use crate::run::{Linkers, Program};

/// Counters for where modules came from (each load increments exactly one of the first
/// three) and how many programs left the memory cache to make room.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub memory_hits: u64,
    pub disk_hits: u64,
    pub compiles: u64,
    pub memory_evictions: u64,
}

/// Where a load found its module, reported in the sandbox's info as `cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Memory,
    Disk,
    Compiled,
}

impl Source {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Source::Memory => "memory",
            Source::Disk => "disk",
            Source::Compiled => "compiled",
        }
    }
}

/// Why a module cannot be run: the message names the path and the cause.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    #[error("read wasm module {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    /// Not something a module can be read from (a device, a directory, too large a file).
    #[error("{0}")]
    Refused(String),
}

/// The largest module or component file loaded (the largest real ones are tens of MiB): a
/// path to something bigger, or to a device like `/dev/zero`, must not fill the server's
/// memory.
pub(crate) const MAX_MODULE_BYTES: u64 = 512 << 20;

/// Reads a module file: a regular file of at most [`MAX_MODULE_BYTES`]. `before` is the
/// path's metadata taken before the open (opening a FIFO would wait for a writer); the open
/// file is checked again, and its length while reading, in case it changed or grows.
fn read_module(
    path: &Path,
    before: &std::fs::Metadata,
    held: Option<&std::fs::File>,
) -> Result<Vec<u8>, LoadError> {
    use std::io::Read as _;
    let shown = || path.display().to_string();
    let read_error = |source| LoadError::Read {
        path: shown(),
        source,
    };
    let not_regular = || LoadError::Refused(format!("wasm module {}: not a regular file", shown()));
    if !before.is_file() {
        return Err(not_regular());
    }
    let opened;
    let file = match held {
        Some(file) => file,
        None => {
            opened = std::fs::File::open(path).map_err(read_error)?;
            &opened
        }
    };
    let meta = file.metadata().map_err(read_error)?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    let too_large = || {
        LoadError::Refused(format!(
            "wasm module {}: larger than the {} MiB a module may have",
            shown(),
            MAX_MODULE_BYTES >> 20
        ))
    };
    if meta.len() > MAX_MODULE_BYTES {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_MODULE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_MODULE_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

pub(crate) struct ModuleCache {
    engine: Engine,
    linkers: Linkers,
    dir: PathBuf,
    /// Hex of the engine-compatibility hash, part of every disk key.
    engine_key: String,
    programs: Mutex<Programs>,
    /// Most bytes of `.cwasm` files kept in `dir`; `None` is unlimited.
    max_disk_bytes: Option<u64>,
    /// The digest of each file loaded, by path, with the identity it had then: a file whose
    /// identity is unchanged is not read and hashed again (one `statx` instead).
    digests: Mutex<HashMap<PathBuf, (FileIdentity, [u8; 32])>>,
    memory_hits: AtomicU64,
    disk_hits: AtomicU64,
    compiles: AtomicU64,
    memory_evictions: AtomicU64,
}

/// The programs in memory, least recently used first out once `capacity` is reached.
///
/// A use stamps the entry with a counter; eviction scans for the lowest stamp. Evicting
/// happens only after a compile or a disk read (milliseconds each), over at most `capacity`
/// entries, so the scan costs nothing that shows, and a hit stays one hash lookup.
struct Programs {
    capacity: usize,
    clock: u64,
    entries: HashMap<[u8; 32], (Program, u64)>,
}

impl Programs {
    fn new(capacity: usize) -> Self {
        Programs {
            capacity: capacity.max(1),
            clock: 0,
            entries: HashMap::new(),
        }
    }

    fn get(&mut self, digest: &[u8; 32]) -> Option<Program> {
        self.clock += 1;
        let (program, used) = self.entries.get_mut(digest)?;
        *used = self.clock;
        Some(program.clone())
    }

    /// Keeps `program`, returning how many programs it pushed out.
    fn insert(&mut self, digest: [u8; 32], program: Program) -> u64 {
        let mut evicted = 0;
        while !self.entries.contains_key(&digest) && self.entries.len() >= self.capacity {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(key, _)| *key)
            else {
                break;
            };
            self.entries.remove(&oldest);
            evicted += 1;
        }
        self.clock += 1;
        self.entries.insert(digest, (program, self.clock));
        evicted
    }

    fn contains(&self, digest: &[u8; 32]) -> bool {
        self.entries.contains_key(digest)
    }
}

impl fmt::Debug for ModuleCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModuleCache")
            .field("dir", &self.dir)
            .field("engine_key", &self.engine_key)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Feeds `Hash` output into SHA-256 (std's hasher is not stable across Rust releases).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(&self) -> u64 {
        0
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ModuleCache {
    /// A cache in `dir` keeping at most `memory_programs` programs in memory and
    /// `max_disk_bytes` of compiled files on disk.
    pub(crate) fn new(
        engine: Engine,
        linkers: Linkers,
        dir: PathBuf,
        memory_programs: usize,
        max_disk_bytes: Option<u64>,
    ) -> Self {
        let mut hasher = ShaHasher(Sha256::new());
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
        // Belt and braces: the hash above includes wasmtime's own version already.
        hasher.write(b"wasmtime-48");
        let engine_key = hex(&hasher.0.finalize()[..8]);
        ModuleCache {
            engine,
            linkers,
            dir,
            engine_key,
            programs: Mutex::new(Programs::new(memory_programs)),
            max_disk_bytes,
            digests: Mutex::new(HashMap::new()),
            memory_hits: AtomicU64::new(0),
            disk_hits: AtomicU64::new(0),
            compiles: AtomicU64::new(0),
            memory_evictions: AtomicU64::new(0),
        }
    }

    pub(crate) fn stats(&self) -> CacheStats {
        CacheStats {
            memory_hits: self.memory_hits.load(Ordering::Relaxed),
            disk_hits: self.disk_hits.load(Ordering::Relaxed),
            compiles: self.compiles.load(Ordering::Relaxed),
            memory_evictions: self.memory_evictions.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Programs> {
        self.programs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn digests(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, (FileIdentity, [u8; 32])>> {
        self.digests.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads the module or component at `path` (binary or text), compiling it only if neither
    /// cache has it, and checks that it is a runnable WASI command.
    pub(crate) async fn load(&self, path: &Path) -> Result<(Program, Source), LoadError> {
        self.load_held(path, None).await
    }

    /// [`ModuleCache::load`] of a module file already open (`held`, the file found at `path`
    /// when it was checked): read through that handle, so what runs is what was checked,
    /// whatever `path` names by now.
    pub(crate) async fn load_held(
        &self,
        path: &Path,
        held: Option<&std::fs::File>,
    ) -> Result<(Program, Source), LoadError> {
        let shown = path.display().to_string();
        let read_error = |source| LoadError::Read {
            path: shown.clone(),
            source,
        };
        let before = match held {
            Some(file) => file.metadata(),
            None => std::fs::metadata(path),
        }
        .map_err(read_error)?;
        let identity = FileIdentity::of_metadata(&before);
        let known = self.digests().get(path).copied();
        if let Some((was, digest)) = known
            && was == identity
            && let Some(pre) = self.lock().get(&digest)
        {
            self.memory_hits.fetch_add(1, Ordering::Relaxed);
            debug!(module = %shown, "wasm: module cache hit (memory, file unchanged)");
            return Ok((pre, Source::Memory));
        }
        let bytes = read_module(path, &before, held)?;
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        // Only an identity taken before the read may vouch for these bytes; one that
        // changed meanwhile just misses next time.
        let now = match held {
            Some(file) => file.metadata().map(|m| FileIdentity::of_metadata(&m)),
            None => FileIdentity::of(path),
        };
        if now.is_ok_and(|now| now == identity) {
            self.remember_digest(path, identity, digest);
        }
        if let Some(pre) = self.lock().get(&digest) {
            self.memory_hits.fetch_add(1, Ordering::Relaxed);
            debug!(module = %shown, "wasm: module cache hit (memory)");
            return Ok((pre, Source::Memory));
        }
        let cwasm = self
            .dir
            .join(format!("{}-{}.cwasm", hex(&digest), self.engine_key));
        let engine = self.engine.clone();
        let job_path = shown.clone();
        let max_disk_bytes = self.max_disk_bytes;
        let (compiled, source) = tokio::task::spawn_blocking(move || {
            compile_or_read(&engine, &bytes, &cwasm, &job_path, max_disk_bytes)
        })
        .await
        .map_err(|e| LoadError::Invalid(format!("loading {shown} failed: {e}")))??;
        match source {
            Source::Disk => self.disk_hits.fetch_add(1, Ordering::Relaxed),
            _ => self.compiles.fetch_add(1, Ordering::Relaxed),
        };
        let program = match compiled {
            Compiled::Module(module) => {
                check_command(&module, &shown)?;
                let pre =
                    self.linkers.module.instantiate_pre(&module).map_err(|e| {
                        LoadError::Invalid(format!("{shown} cannot be linked: {e:#}"))
                    })?;
                Program::Module(pre)
            }
            Compiled::Component(component) => {
                let pre = self
                    .linkers
                    .component
                    .instantiate_pre(&component)
                    .map_err(|e| LoadError::Invalid(format!("{shown} cannot be linked: {e:#}")))?;
                let pre = CommandPre::new(pre).map_err(|e| {
                    LoadError::Invalid(format!(
                        "{shown} is a component but not a WASI command (it must export \
                         `wasi:cli/run@0.2.x`): {e:#}"
                    ))
                })?;
                Program::Component(pre)
            }
        };
        let evicted = self.lock().insert(digest, program.clone());
        if evicted > 0 {
            self.memory_evictions.fetch_add(evicted, Ordering::Relaxed);
            debug!(
                evicted,
                "wasm: module cache full in memory, least recently used left"
            );
        }
        Ok((program, source))
    }

    /// Remembers the digest of the file at `path`; the paths of programs no longer in memory
    /// are forgotten once there are more than a few per program (so a node that runs a new
    /// file per sandbox keeps a bounded map).
    fn remember_digest(&self, path: &Path, identity: FileIdentity, digest: [u8; 32]) {
        let mut digests = self.digests();
        digests.insert(path.to_path_buf(), (identity, digest));
        let limit = self.lock().capacity.saturating_mul(4).max(64);
        if digests.len() > limit {
            let programs = self.lock();
            digests.retain(|_, (_, d)| programs.contains(d) || *d == digest);
            if digests.len() > limit {
                digests.retain(|_, (_, d)| *d == digest);
            }
        }
    }
}

enum Compiled {
    Module(Module),
    Component(Component),
}

impl Compiled {
    fn serialize(&self) -> wasmtime::Result<Vec<u8>> {
        match self {
            Compiled::Module(m) => m.serialize(),
            Compiled::Component(c) => c.serialize(),
        }
    }
}

/// A component's preamble has layer 1 where a core module has version 1.
fn is_binary_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[..4] == b"\0asm" && bytes[6..8] == [1, 0]
}

fn compile_or_read(
    engine: &Engine,
    bytes: &[u8],
    cwasm: &Path,
    shown: &str,
    max_disk_bytes: Option<u64>,
) -> Result<(Compiled, Source), LoadError> {
    if cwasm.exists() {
        match deserialize_own_cache_file(engine, cwasm) {
            Ok(compiled) => {
                debug!(module = %shown, cache = %cwasm.display(), "wasm: module cache hit (disk)");
                // The mtime is the file's last use, for the trimming below.
                if let Err(e) = std::fs::File::open(cwasm)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()))
                {
                    debug!(cache = %cwasm.display(), "wasm: cannot mark the cache file used: {e}");
                }
                return Ok((compiled, Source::Disk));
            }
            Err(e) => {
                warn!(cache = %cwasm.display(), "wasm: unusable cache file, recompiling: {e:#}")
            }
        }
    }
    let started = std::time::Instant::now();
    // WAT text is turned into a binary first, so that a syntax error (told without the
    // file's text) is not confused with a module the engine refuses.
    let binary = ImageStore::wasm_binary(Path::new(shown), bytes)
        .map_err(|e| LoadError::Invalid(not_a_module(shown, &e)))?;
    let compiled = if is_binary_component(&binary) {
        Compiled::Component(
            Component::from_binary(engine, &binary)
                .map_err(|e| LoadError::Invalid(not_compiled(shown, "component", &e)))?,
        )
    } else {
        Compiled::Module(
            Module::from_binary(engine, &binary)
                .map_err(|e| LoadError::Invalid(not_compiled(shown, "module", &e)))?,
        )
    };
    info!(module = %shown, elapsed_ms = started.elapsed().as_millis() as u64, "wasm: compiled module");
    if let Err(e) = write_cache_file(&compiled, cwasm) {
        warn!(cache = %cwasm.display(), "wasm: cannot write the module cache: {e:#}");
    } else if let Some(max) = max_disk_bytes {
        trim_disk_cache(cwasm, max);
    }
    Ok((compiled, Source::Compiled))
}

/// How old a temporary file of [`write_cache_file`] must be to be taken for a crashed
/// writer's and removed.
const STALE_TEMPORARY: std::time::Duration = std::time::Duration::from_secs(600);

/// Removes the least recently used `.cwasm` files beside `keep` until they hold at most
/// `max` bytes (`keep`, just written, stays whatever its size), and temporaries a crash left.
fn trim_disk_cache(keep: &Path, max: u64) {
    let Some(dir) = keep.parent() else { return };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            warn!(dir = %dir.display(), "wasm: cannot list the module cache: {e}");
            return;
        }
    };
    let now = std::time::SystemTime::now();
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        let modified = meta.modified().unwrap_or(now);
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.contains(".tmp-") {
            if now
                .duration_since(modified)
                .is_ok_and(|age| age > STALE_TEMPORARY)
            {
                let _ = std::fs::remove_file(&path);
            }
        } else if name.ends_with(".cwasm") && meta.is_file() {
            files.push((modified, meta.len(), path));
        }
    }
    let mut total: u64 = files.iter().map(|(_, len, _)| len).sum();
    if total <= max {
        return;
    }
    files.sort();
    let mut removed = 0u32;
    for (_, len, path) in files {
        if total <= max {
            break;
        }
        if path == keep {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                total -= len;
                removed += 1;
            }
            // Another compile's trim got there first.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => total -= len,
            Err(e) => warn!(cache = %path.display(), "wasm: cannot remove a cache file: {e}"),
        }
    }
    info!(
        removed,
        bytes = total,
        max,
        "wasm: module cache on disk trimmed to its size"
    );
}

/// Loads a `.cwasm` this backend wrote, as the module or component its header says it is.
///
/// Both `deserialize_file`s trust the file to be the output of `serialize` and map it into
/// memory. The file lives in this backend's private cache directory and is only ever written
/// by `write_cache_file`, from `serialize`, to a temporary name renamed into place: it is
/// never modified once visible, so the mapping cannot change under us. wasmtime still checks
/// its header against this engine's version and settings, and the key includes both. Anyone
/// able to write this directory already controls the node.
#[allow(unsafe_code)]
fn deserialize_own_cache_file(engine: &Engine, path: &Path) -> wasmtime::Result<Compiled> {
    if let Some(Precompiled::Component) = Engine::detect_precompiled_file(path)? {
        // SAFETY: see above; wasmtime also refuses a module's artifact here.
        let component = unsafe { Component::deserialize_file(engine, path) }?;
        Ok(Compiled::Component(component))
    } else {
        // SAFETY: see above; wasmtime also refuses a component's artifact here.
        let module = unsafe { Module::deserialize_file(engine, path) }?;
        Ok(Compiled::Module(module))
    }
}

fn write_cache_file(compiled: &Compiled, path: &Path) -> wasmtime::Result<()> {
    let bytes = compiled.serialize()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp-{}-{n}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A WASI command exports `_start: [] -> []`.
fn check_command(module: &Module, shown: &str) -> Result<(), LoadError> {
    match module.get_export("_start") {
        Some(ExternType::Func(f)) if f.params().len() == 0 && f.results().len() == 0 => Ok(()),
        Some(_) => Err(LoadError::Invalid(format!(
            "{shown} exports `_start`, but not as a function taking and returning nothing"
        ))),
        None => Err(LoadError::Invalid(format!(
            "{shown} has no `_start` function: the wasm backend runs WASI commands \
             (a reactor or library module has none)"
        ))),
    }
}

/// Why a file is neither a Wasm binary nor WAT text, from [`ImageStore::wasm_binary`], which
/// never quotes the file (the path may name any host file the server can read): which of the
/// two it fails to be, and for text, where and what kind of error.
fn not_a_module(shown: &str, e: &ImageError) -> String {
    let ImageError::InvalidModule { reason, source, .. } = e else {
        return format!("{shown}: {e}");
    };
    match source {
        Some(source) => format!("{shown} is not a WebAssembly module ({reason}): {source}"),
        None => format!("{shown} is not a WebAssembly module ({reason})"),
    }
}

/// Why the engine refuses a Wasm binary (given as such or compiled from WAT): invalid, or
/// beyond its limits (a memory larger than an instance may have). wasmtime's reason names
/// a section, an offset or a limit; of the module's own text only names it declares
/// (imports, exports), which a file that is not a module has none of.
fn not_compiled(shown: &str, kind: &str, e: &wasmtime::Error) -> String {
    format!("{shown} cannot be compiled as a WebAssembly {kind}: {e:#}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digests_of_files_no_program_holds_are_forgotten() {
        let engine = Engine::default();
        let linkers = crate::run::linkers(&engine).expect("linkers");
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ModuleCache::new(engine, linkers, dir.path().join("cache"), 1, None);
        let identity = FileIdentity::of(dir.path()).expect("identity");
        for i in 0..1000u32 {
            let mut digest = [0u8; 32];
            digest[..4].copy_from_slice(&i.to_le_bytes());
            cache.remember_digest(&dir.path().join(format!("m{i}.wasm")), identity, digest);
            assert!(
                cache.digests().len() <= 65,
                "{i}: {}",
                cache.digests().len()
            );
        }
        // The last one is always kept: the load that remembered it uses it next.
        let last = dir.path().join("m999.wasm");
        assert!(cache.digests().contains_key(&last));
    }

    #[test]
    fn binary_components_are_told_from_modules() {
        assert!(is_binary_component(b"\0asm\x0d\0\x01\0"));
        assert!(!is_binary_component(b"\0asm\x01\0\0\0"));
        assert!(!is_binary_component(b"(component)"));
    }
}
