//! Where the server keeps checkpoints, and what makes one trustworthy.
//!
//! A checkpoint is a directory: the backend's payload (for linux: CRIU's images, the root
//! filesystem's changes, the output so far) and `manifest.json` ([`Manifest`]): the source
//! sandbox's spec and resources, its backend, when it was taken, the engine (CRIU's version),
//! the payload's size, and the size and SHA-256 of every payload file with a digest over that
//! list. [`Manifest::verify`] checks all of it before a restore uses a byte, so a corrupt or
//! truncated checkpoint is refused before anything is created.
//!
//! A digest only finds damage: whoever writes an archive can write a matching manifest. So
//! the manifest is also sealed: `manifest.mac` holds an HMAC-SHA256 of `manifest.json`'s
//! bytes under the server's secret [`CheckpointKey`], and a checkpoint without a seal this
//! server can check is refused. CRIU's images and `rootfs.tar` are restored as root, so only
//! checkpoints taken by this server (or by one that shares its key) are ever restored.
//!
//! Stored checkpoints live in `<server dir>/checkpoints/<name>/`; one being written is a
//! hidden `.tmp-*` directory renamed into place once sealed, so a crash never leaves a
//! half-written checkpoint under a name. A checkpoint travels as that directory or as a tar
//! (optionally gzip) of it ([`export`], [`import`]): a restore on another server verifies it
//! the same way.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use warren_spec::{BackendKind, ResourceInfo, SandboxSpec};

/// The manifest's file name in a checkpoint directory.
pub const MANIFEST: &str = "manifest.json";
/// The seal's file name: the manifest's MAC under the server's key.
pub const SEAL: &str = "manifest.mac";
/// The manifest format this server writes and reads.
pub const FORMAT: u32 = 1;
const TMP_PREFIX: &str = ".tmp-";
/// In the store once its checkpoints from before seals were sealed.
const SEALED_MARKER: &str = ".sealed";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {name:?} not found")]
    NotFound { name: String },
    #[error("checkpoint {name:?} already exists (delete it first, or pick another --name)")]
    AlreadyExists { name: String },
    #[error("checkpoint {name:?} is being restored; retry")]
    InUse { name: String },
    /// A restore's name belongs to a sandbox that has not finished.
    #[error("sandbox {name:?} exists and has not finished: restore under another name (--name)")]
    NameTaken { name: String },
    #[error("checkpoint {what} is corrupt or incomplete: {reason}")]
    Corrupt { what: String, reason: String },
    /// The checkpoint's seal is missing or made with another key.
    #[error(
        "checkpoint {what} {reason}: only checkpoints sealed with this server's key ({key}) are restored; give servers that exchange checkpoints the same --checkpoint-key"
    )]
    Untrusted {
        what: String,
        reason: &'static str,
        key: String,
    },
    /// Writing a checkpoint to its output failed after the dump stopped the sandbox; the
    /// checkpoint, the only copy of its state, was stored instead.
    #[error(
        "{reason}; the sandbox stopped at the checkpoint, so the checkpoint is kept as {name:?} (warren restore {name}, or warren checkpoint export {name} PATH)"
    )]
    Kept { name: String, reason: String },
    /// The key file cannot be used.
    #[error("checkpoint key {path}: {reason}")]
    Key { path: String, reason: String },
    /// A request field is wrong; the message names it and its value.
    #[error("{0}")]
    Invalid(String),
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CheckpointError + 'a {
    move |source| CheckpointError::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}

/// The server's secret for sealing checkpoints: 32 random bytes, kept hex-encoded in a file
/// only its owner may read (`<server dir>/checkpoint.key` unless `--checkpoint-key` names
/// another, which servers exchanging checkpoints share).
#[derive(Clone)]
pub struct CheckpointKey {
    key: [u8; 32],
    path: PathBuf,
}

impl std::fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointKey")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

type HmacSha256 = Hmac<Sha256>;

impl CheckpointKey {
    /// Reads the key at `path`, or makes a new one there if there is no file (the server's
    /// own default key). Two servers making one at once both end with the same key.
    pub fn load_or_create(path: &Path) -> Result<CheckpointKey, CheckpointError> {
        match Self::load(path) {
            Err(CheckpointError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Self::create(path)
            }
            other => other,
        }
    }

    /// Makes a new key at `path`: written whole to a private temporary file beside it, then
    /// linked to its name only if that is still free (a crash leaves no empty key; a key made
    /// meanwhile by another server is read instead).
    fn create(path: &Path) -> Result<CheckpointKey, CheckpointError> {
        let bad = |reason: String| CheckpointError::Key {
            path: path.display().to_string(),
            reason,
        };
        let mut key = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut r| r.read_exact(&mut key))
            .map_err(|e| bad(format!("no random bytes for a new key: {e}")))?;
        let parent = path.parent().unwrap_or(Path::new("/"));
        // tempfile makes its files 0600.
        let mut tmp = tempfile::Builder::new()
            .prefix(".checkpoint-key-")
            .tempfile_in(parent)
            .map_err(io("create a file in", parent))?;
        tmp.write_all(format!("{}\n", hex::encode(key)).as_bytes())
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(io("write", tmp.path()))?;
        match tmp.persist_noclobber(path) {
            Ok(_) => {
                tracing::info!(path = %path.display(), "made a new checkpoint key");
                Ok(CheckpointKey {
                    key,
                    path: path.to_path_buf(),
                })
            }
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Self::load(path),
            Err(e) => Err(io("create", path)(e.error)),
        }
    }

    /// Reads the key at `path`: 64 hex digits in a file only its owner may read.
    pub fn load(path: &Path) -> Result<CheckpointKey, CheckpointError> {
        use std::os::unix::fs::PermissionsExt;
        let bad = |reason: String| CheckpointError::Key {
            path: path.display().to_string(),
            reason,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                let mode = std::fs::metadata(path)
                    .map_err(io("read", path))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(bad(format!(
                        "others may read or write it (mode {:04o}): chmod 600 it",
                        mode & 0o7777
                    )));
                }
                let text = std::str::from_utf8(&bytes).unwrap_or("").trim();
                let mut key = [0u8; 32];
                hex::decode_to_slice(text, &mut key).map_err(|_| {
                    bad(format!(
                        "it must hold 64 hex digits (32 random bytes, e.g. `openssl rand -hex 32`); it holds {} bytes that are not that",
                        bytes.len()
                    ))
                })?;
                Ok(CheckpointKey {
                    key,
                    path: path.to_path_buf(),
                })
            }
            Err(e) => Err(io("read", path)(e)),
        }
    }

    /// A key from its bytes (tests; `path` only names it in messages).
    pub fn from_bytes(key: [u8; 32], path: &Path) -> CheckpointKey {
        CheckpointKey {
            key,
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn hmac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.key).expect("HMAC takes a key of any length")
    }

    /// The seal of a manifest's bytes: `hmac-sha256:<hex>`.
    fn seal(&self, manifest: &[u8]) -> String {
        let mut mac = self.hmac();
        mac.update(manifest);
        format!("hmac-sha256:{}", hex::encode(mac.finalize().into_bytes()))
    }

    /// Whether `seal` is this key's seal of `manifest` (compared in constant time).
    fn check(&self, manifest: &[u8], seal: &str) -> bool {
        let Some(tag) = seal
            .trim()
            .strip_prefix("hmac-sha256:")
            .and_then(|h| hex::decode(h).ok())
        else {
            return false;
        };
        let mut mac = self.hmac();
        mac.update(manifest);
        mac.verify_slice(&tag).is_ok()
    }
}

/// One payload file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileEntry {
    /// Relative, `/`-separated.
    pub path: String,
    pub size: u64,
    /// Hex SHA-256 of the content.
    pub sha256: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    /// The sandbox it was taken of: name and id then.
    pub sandbox: String,
    pub sandbox_id: String,
    pub backend: BackendKind,
    pub spec: SandboxSpec,
    pub resources: ResourceInfo,
    pub created_at_ms: i64,
    /// The sandbox ran on after it was taken.
    pub leave_running: bool,
    /// What the backend recorded ("engine", "criuVersion", "image"...).
    #[serde(default)]
    pub engine: BTreeMap<String, String>,
    /// CRIU's version, for a linux checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criu_version: Option<String>,
    /// Bytes of payload.
    pub size: u64,
    /// `sha256:<hex>` over the file list (see [`list_digest`]).
    pub digest: String,
    pub files: Vec<FileEntry>,
}

/// What a manifest says besides its payload's files.
#[derive(Debug, Clone)]
pub struct ManifestBase {
    pub name: String,
    pub sandbox: String,
    pub sandbox_id: String,
    pub backend: BackendKind,
    pub spec: SandboxSpec,
    pub resources: ResourceInfo,
    pub created_at_ms: i64,
    pub leave_running: bool,
    pub engine: BTreeMap<String, String>,
}

/// The digest over a file list: SHA-256 of one line per file, `<sha256> <size> <path>\n`, in
/// path order.
pub fn list_digest(files: &[FileEntry]) -> String {
    let mut h = Sha256::new();
    for f in files {
        h.update(format!("{} {} {}\n", f.sha256, f.size, f.path).as_bytes());
    }
    format!("sha256:{:x}", h.finalize())
}

fn file_entry(dir: &Path, rel: &Path) -> Result<FileEntry, CheckpointError> {
    let path = dir.join(rel);
    let mut file = std::fs::File::open(&path).map_err(io("read", &path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io("read", &path))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok(FileEntry {
        path: slash_path(rel),
        size,
        sha256: format!("{:x}", h.finalize()),
    })
}

fn slash_path(rel: &Path) -> String {
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Every file under `dir` but the manifest and its seal, relative and sorted. Anything but regular files
/// and directories (a symlink, a device) is refused: a payload holds none.
fn payload_files(dir: &Path, what: &str) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut files = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        let here = dir.join(&rel);
        for entry in std::fs::read_dir(&here).map_err(io("read", &here))? {
            let entry = entry.map_err(io("read", &here))?;
            let path = rel.join(entry.file_name());
            let kind = entry.file_type().map_err(io("read", &entry.path()))?;
            if kind.is_dir() {
                dirs.push(path);
            } else if kind.is_file() {
                if path != Path::new(MANIFEST) && path != Path::new(SEAL) {
                    files.push(path);
                }
            } else {
                return Err(CheckpointError::Corrupt {
                    what: what.to_string(),
                    reason: format!("{} is not a regular file", slash_path(&path)),
                });
            }
        }
    }
    files.sort();
    Ok(files)
}

impl Manifest {
    /// Lists and digests the payload in `dir` and writes `manifest.json` there, sealed with
    /// `key` in `manifest.mac`.
    pub fn seal(
        dir: &Path,
        base: ManifestBase,
        key: &CheckpointKey,
    ) -> Result<Manifest, CheckpointError> {
        let files = payload_files(dir, &base.name)?
            .iter()
            .map(|rel| file_entry(dir, rel))
            .collect::<Result<Vec<_>, _>>()?;
        let manifest = Manifest {
            format: FORMAT,
            criu_version: base.engine.get("criuVersion").cloned(),
            name: base.name,
            sandbox: base.sandbox,
            sandbox_id: base.sandbox_id,
            backend: base.backend,
            spec: base.spec,
            resources: base.resources,
            created_at_ms: base.created_at_ms,
            leave_running: base.leave_running,
            engine: base.engine,
            size: files.iter().map(|f| f.size).sum(),
            digest: list_digest(&files),
            files,
        };
        let bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::Io {
            action: "encode",
            path: dir.join(MANIFEST).display().to_string(),
            source: std::io::Error::other(e),
        })?;
        let seal = dir.join(SEAL);
        std::fs::write(&seal, format!("{}\n", key.seal(&bytes))).map_err(io("write", &seal))?;
        let path = dir.join(MANIFEST);
        std::fs::write(&path, bytes).map_err(io("write", &path))?;
        Ok(manifest)
    }

    fn read_bytes(dir: &Path, what: &str) -> Result<Vec<u8>, CheckpointError> {
        read_small(dir, MANIFEST, MAX_MANIFEST, what)?.ok_or_else(|| CheckpointError::Corrupt {
            what: what.to_string(),
            reason: format!("it has no {MANIFEST}"),
        })
    }

    /// Reads `dir/manifest.json` without checking the payload or the seal (for listings).
    pub fn read(dir: &Path, what: &str) -> Result<Manifest, CheckpointError> {
        Self::parse(&Self::read_bytes(dir, what)?, what)
    }

    fn parse(bytes: &[u8], what: &str) -> Result<Manifest, CheckpointError> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| CheckpointError::Corrupt {
                what: what.to_string(),
                reason: format!("{MANIFEST}: {e}"),
            })?;
        if manifest.format != FORMAT {
            return Err(CheckpointError::Corrupt {
                what: what.to_string(),
                reason: format!(
                    "{MANIFEST}: format {} (this server reads format {FORMAT})",
                    manifest.format
                ),
            });
        }
        Ok(manifest)
    }

    /// Whether `seal` is `key`'s seal of the manifest `bytes`.
    fn check_seal(
        bytes: &[u8],
        seal: &[u8],
        what: &str,
        key: &CheckpointKey,
    ) -> Result<(), CheckpointError> {
        if key.check(bytes, &String::from_utf8_lossy(seal)) {
            return Ok(());
        }
        Err(CheckpointError::Untrusted {
            what: what.to_string(),
            reason: "has a seal made with another key, or a manifest changed after sealing",
            key: key.path().display().to_string(),
        })
    }

    /// The manifest of the checkpoint directory `dir` and its seal, as read, once the seal
    /// is checked under `key` (before a restore copies anything of it).
    fn sealed(
        dir: &Path,
        what: &str,
        key: &CheckpointKey,
    ) -> Result<(Vec<u8>, Vec<u8>, Manifest), CheckpointError> {
        let bytes = Self::read_bytes(dir, what)?;
        let Some(seal) = read_small(dir, SEAL, MAX_SEAL, what)? else {
            return Err(CheckpointError::Untrusted {
                what: what.to_string(),
                reason: "is not sealed (it has no manifest.mac)",
                key: key.path().display().to_string(),
            });
        };
        Self::check_seal(&bytes, &seal, what, key)?;
        let manifest = Self::parse(&bytes, what)?;
        Ok((bytes, seal, manifest))
    }

    /// Checks the manifest's seal under `key`, then every payload file against the
    /// manifest: present, of its size and SHA-256, nothing missing or extra, and the list's
    /// digest.
    pub fn verify(
        dir: &Path,
        what: &str,
        key: &CheckpointKey,
    ) -> Result<Manifest, CheckpointError> {
        let bytes = Self::read_bytes(dir, what)?;
        let untrusted = |reason| CheckpointError::Untrusted {
            what: what.to_string(),
            reason,
            key: key.path().display().to_string(),
        };
        let Some(seal) = read_small(dir, SEAL, MAX_SEAL, what)? else {
            return Err(untrusted("is not sealed (it has no manifest.mac)"));
        };
        Self::check_seal(&bytes, &seal, what, key)?;
        let manifest = Self::parse(&bytes, what)?;
        let corrupt = |reason: String| CheckpointError::Corrupt {
            what: what.to_string(),
            reason,
        };
        let digest = list_digest(&manifest.files);
        if digest != manifest.digest {
            return Err(corrupt(format!(
                "its file list has digest {digest}, the manifest says {}",
                manifest.digest
            )));
        }
        let present = payload_files(dir, what)?;
        let listed: BTreeMap<&str, &FileEntry> = manifest
            .files
            .iter()
            .map(|f| (f.path.as_str(), f))
            .collect();
        for rel in &present {
            if !listed.contains_key(slash_path(rel).as_str()) {
                return Err(corrupt(format!(
                    "{} is not in the manifest",
                    slash_path(rel)
                )));
            }
        }
        for f in &manifest.files {
            let rel = safe_relative(&f.path)
                .ok_or_else(|| corrupt(format!("the manifest lists a bad path {:?}", f.path)))?;
            if !dir.join(&rel).is_file() {
                return Err(corrupt(format!("{} is missing", f.path)));
            }
            let got = file_entry(dir, &rel)?;
            if got.size != f.size {
                return Err(corrupt(format!(
                    "{} has {} bytes, the manifest says {} (truncated?)",
                    f.path, got.size, f.size
                )));
            }
            if got.sha256 != f.sha256 {
                return Err(corrupt(format!(
                    "{} has sha256 {}, the manifest says {}",
                    f.path, got.sha256, f.sha256
                )));
            }
        }
        Ok(manifest)
    }
}

/// Opens `dir/rel` for reading as a regular file, never through a link and without
/// blocking on a FIFO; `None` if there is no such file.
fn open_regular(
    dir: &Path,
    rel: &str,
    what: &str,
) -> Result<Option<(std::fs::File, u64)>, CheckpointError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(rel);
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(CheckpointError::Corrupt {
                what: what.to_string(),
                reason: format!("{rel} is a symlink, not a regular file"),
            });
        }
        Err(e) => return Err(io("read", &path)(e)),
    };
    let meta = file.metadata().map_err(io("read", &path))?;
    if !meta.is_file() {
        return Err(CheckpointError::Corrupt {
            what: what.to_string(),
            reason: format!("{rel} is not a regular file"),
        });
    }
    Ok(Some((file, meta.len())))
}

/// `dir/rel` (a regular file, at most `max` bytes), or `None` if there is none.
fn read_small(
    dir: &Path,
    rel: &str,
    max: u64,
    what: &str,
) -> Result<Option<Vec<u8>>, CheckpointError> {
    let Some((file, _)) = open_regular(dir, rel, what)? else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(io("read", &dir.join(rel)))?;
    if bytes.len() as u64 > max {
        return Err(CheckpointError::Corrupt {
            what: what.to_string(),
            reason: format!("{rel} has more than {max} bytes"),
        });
    }
    Ok(Some(bytes))
}

/// A manifest path as a relative path inside the checkpoint, or `None` if it leaves it.
fn safe_relative(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    if path.is_empty() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    Some(p.to_path_buf())
}

/// Seals a checkpoint stored before seals existed: only this server writes its store, so
/// what is there is its own. (Its payload is still checked against the manifest at use.)
fn seal_stored(dir: &Path, name: &str, key: &CheckpointKey) {
    if !dir.is_dir() || dir.is_symlink() || dir.join(SEAL).exists() {
        return;
    }
    let Ok(Some(manifest)) = read_small(dir, MANIFEST, MAX_MANIFEST, name) else {
        return;
    };
    match std::fs::write(dir.join(SEAL), format!("{}\n", key.seal(&manifest))) {
        Ok(()) => tracing::info!(checkpoint = %name, "sealed a checkpoint stored before seals"),
        Err(e) => tracing::warn!(checkpoint = %name, error = %e, "cannot seal a stored checkpoint"),
    }
}

/// The checkpoints stored under one directory.
#[derive(Debug)]
pub struct CheckpointStore {
    root: PathBuf,
    key: CheckpointKey,
    /// Checkpoints a restore is reading, with how many restores.
    in_use: Mutex<HashMap<String, usize>>,
}

/// A checkpoint marked in use while it lives (see [`CheckpointStore::lease`]).
#[derive(Debug)]
pub struct Lease {
    store: Arc<CheckpointStore>,
    name: String,
    pub dir: PathBuf,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut in_use = self.store.lock();
        if let Some(n) = in_use.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                in_use.remove(&self.name);
            }
        }
    }
}

/// A directory removed on drop unless [`Scratch::keep`] was called.
#[derive(Debug)]
pub struct Scratch {
    pub path: PathBuf,
    keep: bool,
}

impl Scratch {
    pub fn keep(mut self) -> PathBuf {
        self.keep = true;
        std::mem::take(&mut self.path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

impl CheckpointStore {
    /// Opens (creating) the store, whose checkpoints are sealed with `key`, and removes what
    /// an interrupted write left.
    pub fn open(root: &Path, key: CheckpointKey) -> Result<CheckpointStore, CheckpointError> {
        std::fs::create_dir_all(root).map_err(io("create", root))?;
        // Checkpoints stored before seals are sealed once, at the first start that knows
        // seals; an unsealed one that appears later (copied in by hand) stays untrusted.
        let marker = root.join(SEALED_MARKER);
        let migrated = marker.exists();
        for entry in std::fs::read_dir(root).map_err(io("read", root))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TMP_PREFIX) {
                let _ = std::fs::remove_dir_all(entry.path());
            } else if !migrated && !name.starts_with('.') {
                seal_stored(&entry.path(), &name, &key);
            }
        }
        if !migrated {
            let _ = std::fs::write(&marker, b"");
        }
        Ok(CheckpointStore {
            root: root.to_path_buf(),
            key,
            in_use: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.in_use.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The key this server seals and checks checkpoints with.
    pub fn key(&self) -> &CheckpointKey {
        &self.key
    }

    fn dir(&self, name: &str) -> Result<PathBuf, CheckpointError> {
        warren_spec::validate_name("checkpoint name", name)
            .map_err(|e| CheckpointError::Invalid(e.to_string()))?;
        Ok(self.root.join(name))
    }

    /// A fresh hidden directory in the store, for a checkpoint being written or unpacked.
    pub fn scratch(&self) -> Result<Scratch, CheckpointError> {
        let path = self
            .root
            .join(format!("{TMP_PREFIX}{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&path).map_err(io("create", &path))?;
        Ok(Scratch { path, keep: false })
    }

    /// Fails if `name` is invalid or taken.
    pub fn check_free(&self, name: &str) -> Result<(), CheckpointError> {
        if self.dir(name)?.exists() {
            return Err(CheckpointError::AlreadyExists {
                name: name.to_string(),
            });
        }
        Ok(())
    }

    /// Moves a sealed scratch directory into place under `name`.
    pub fn publish(&self, scratch: Scratch, name: &str) -> Result<PathBuf, CheckpointError> {
        let dir = self.dir(name)?;
        if dir.exists() {
            return Err(CheckpointError::AlreadyExists {
                name: name.to_string(),
            });
        }
        std::fs::rename(&scratch.path, &dir).map_err(io("store the checkpoint at", &dir))?;
        scratch.keep();
        Ok(dir)
    }

    /// Every stored checkpoint's manifest, by name; unreadable ones are skipped with a
    /// warning.
    pub fn list(&self) -> Result<Vec<(PathBuf, Manifest)>, CheckpointError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(io("read", &self.root))? {
            let entry = entry.map_err(io("read", &self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            match Manifest::read(&entry.path(), &format!("{name:?}")) {
                Ok(m) => out.push((entry.path(), m)),
                Err(e) => {
                    tracing::warn!(checkpoint = %name, error = %e, "unreadable checkpoint left as it is")
                }
            }
        }
        out.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        Ok(out)
    }

    /// The stored checkpoint's directory and manifest (not verified).
    pub fn get(&self, name: &str) -> Result<(PathBuf, Manifest), CheckpointError> {
        let dir = self.dir(name)?;
        if !dir.is_dir() {
            return Err(CheckpointError::NotFound {
                name: name.to_string(),
            });
        }
        let manifest = Manifest::read(&dir, &format!("{name:?}"))?;
        Ok((dir, manifest))
    }

    /// Marks the stored checkpoint in use (a delete is refused meanwhile).
    pub fn lease(self: &Arc<Self>, name: &str) -> Result<Lease, CheckpointError> {
        let dir = self.dir(name)?;
        if !dir.is_dir() {
            return Err(CheckpointError::NotFound {
                name: name.to_string(),
            });
        }
        *self.lock().entry(name.to_string()).or_insert(0) += 1;
        Ok(Lease {
            store: Arc::clone(self),
            name: name.to_string(),
            dir,
        })
    }

    /// Removes a stored checkpoint; returns its manifest if it had a readable one.
    pub fn delete(&self, name: &str) -> Result<Option<Manifest>, CheckpointError> {
        let dir = self.dir(name)?;
        if !dir.is_dir() {
            return Err(CheckpointError::NotFound {
                name: name.to_string(),
            });
        }
        if self.lock().contains_key(name) {
            return Err(CheckpointError::InUse {
                name: name.to_string(),
            });
        }
        let manifest = Manifest::read(&dir, name).ok();
        // Renamed first, so the name is free at once and a failed removal leaves only a
        // hidden directory the next start removes.
        let trash = self
            .root
            .join(format!("{TMP_PREFIX}rm-{}", uuid::Uuid::new_v4().simple()));
        std::fs::rename(&dir, &trash).map_err(io("remove", &dir))?;
        std::fs::remove_dir_all(&trash).map_err(io("remove", &trash))?;
        Ok(manifest)
    }
}

/// How a checkpoint is written out: a directory, or a tar (gzip when the name ends in `.gz`
/// or `.tgz`).
fn is_archive(path: &Path) -> bool {
    let name = path.to_string_lossy();
    [".tar", ".tar.gz", ".tgz"]
        .iter()
        .any(|s| name.ends_with(s))
}

fn is_gzip(path: &Path) -> bool {
    let name = path.to_string_lossy();
    name.ends_with(".gz") || name.ends_with(".tgz")
}

/// Checks an output path: absolute, and a new file or an empty or new directory.
pub fn check_output(to: &Path) -> Result<(), CheckpointError> {
    let invalid = |why: &str| {
        CheckpointError::Invalid(format!("output: {:?} {why}", to.display().to_string()))
    };
    if !to.is_absolute() {
        return Err(invalid("is not an absolute path"));
    }
    // Written as given, never through a link (a dangling one failed with "File exists").
    if std::fs::symlink_metadata(to).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(invalid("is a symlink: give the path it points to"));
    }
    // A directory is written for any other name, so an archive kind warren does not write
    // would silently become a directory named like one.
    let name = to.to_string_lossy();
    if let Some(kind) = [
        ".zip", ".tar.xz", ".txz", ".tar.zst", ".tar.bz2", ".tbz2", ".7z",
    ]
    .iter()
    .find(|kind| name.ends_with(*kind))
    {
        return Err(invalid(&format!(
            "ends in {kind}: the output is a directory, or a .tar, .tar.gz or .tgz archive"
        )));
    }
    if is_archive(to) {
        if to.exists() {
            return Err(invalid("exists already"));
        }
    } else if to.exists() {
        let empty = std::fs::read_dir(to)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Err(invalid("exists and is not an empty directory"));
        }
    }
    match to.parent() {
        Some(parent) if parent.is_dir() => Ok(()),
        _ => Err(invalid("has no existing parent directory")),
    }
}

/// Writes the checkpoint in `dir` to `to` (see [`check_output`]); returns bytes written.
pub fn export(dir: &Path, to: &Path) -> Result<u64, CheckpointError> {
    check_output(to)?;
    let parent = to.parent().unwrap_or(Path::new("/"));
    if !is_archive(to) {
        // Copied into a new private directory beside the output, then renamed onto it (a new
        // name, or an empty directory): nothing is written inside a directory others can
        // write to, where a link planted meanwhile would redirect a write made as root.
        let tmp = tempfile::Builder::new()
            .prefix(".warren-checkpoint-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir_in(parent)
            .map_err(io("create a directory in", parent))?;
        let copied = copy_tree(dir, tmp.path())?;
        std::fs::rename(tmp.path(), to).map_err(|e| match e.kind() {
            std::io::ErrorKind::DirectoryNotEmpty
            | std::io::ErrorKind::AlreadyExists
            | std::io::ErrorKind::NotADirectory => CheckpointError::Invalid(format!(
                "output: {:?} is no longer a new or empty directory",
                to.display().to_string()
            )),
            _ => io("write", to)(e),
        })?;
        let _ = tmp.keep();
        return Ok(copied);
    }
    // A new file of a random name beside the output (O_EXCL, never through a link), linked
    // to its name only once complete and only if that name is still free.
    let tmp = tempfile::Builder::new()
        .prefix(".warren-checkpoint-")
        .suffix(".part")
        .tempfile_in(parent)
        .map_err(io("create a file in", parent))?;
    let tmp_path = tmp.path().to_path_buf();
    (|| {
        let file = tmp.as_file().try_clone().map_err(io("write", &tmp_path))?;
        let out: Box<dyn Write> = if is_gzip(to) {
            Box::new(flate2::write::GzEncoder::new(
                file,
                flate2::Compression::fast(),
            ))
        } else {
            Box::new(std::io::BufWriter::new(file))
        };
        let mut archive = tar::Builder::new(out);
        archive.mode(tar::HeaderMode::Deterministic);
        archive.follow_symlinks(false);
        // The manifest and its seal first, so an import checks the seal before it unpacks
        // a byte of payload; then the payload's files, in path order.
        let what = format!("{:?}", dir.display().to_string());
        for rel in [Path::new(MANIFEST), Path::new(SEAL)]
            .into_iter()
            .map(Path::to_path_buf)
            .chain(payload_files(dir, &what)?)
        {
            archive
                .append_path_with_name(dir.join(&rel), &rel)
                .map_err(io("archive", &dir.join(&rel)))?;
        }
        let mut out = archive.into_inner().map_err(io("write", &tmp_path))?;
        out.flush().map_err(io("write", &tmp_path))?;
        drop(out);
        tmp.as_file().sync_all().map_err(io("write", &tmp_path))?;
        let file = tmp.persist_noclobber(to).map_err(|e| {
            if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                CheckpointError::Invalid(format!(
                    "output: {:?} exists already",
                    to.display().to_string()
                ))
            } else {
                io("write", to)(e.error)
            }
        })?;
        file.metadata().map(|m| m.len()).map_err(io("read", to))
    })()
}

/// Copies the checkpoint directory `from` into the empty directory `into` (a restore's own
/// copy of a checkpoint given by path): its seal checked under `key` first, then that it
/// holds nothing the manifest does not list, then the manifest, the seal and the listed
/// files, each of its listed size, opened without following links. ([`Manifest::verify`]
/// then checks every byte of the copy.)
pub fn copy_in(from: &Path, into: &Path, key: &CheckpointKey) -> Result<(), CheckpointError> {
    let what = format!("{:?}", from.display().to_string());
    let (bytes, seal, manifest) = Manifest::sealed(from, &what, key)?;
    let corrupt = |reason: String| CheckpointError::Corrupt {
        what: what.clone(),
        reason,
    };
    // What the copy leaves out is damage all the same: said, as for an archive.
    let listed: std::collections::BTreeSet<&str> =
        manifest.files.iter().map(|f| f.path.as_str()).collect();
    for rel in payload_files(from, &what)? {
        let shown = slash_path(&rel);
        if !listed.contains(shown.as_str()) {
            return Err(corrupt(format!("{shown} is not in the manifest")));
        }
    }
    for (name, content) in [(MANIFEST, &bytes), (SEAL, &seal)] {
        let dst = into.join(name);
        std::fs::write(&dst, content).map_err(io("write", &dst))?;
    }
    for f in &manifest.files {
        let rel = safe_relative(&f.path)
            .ok_or_else(|| corrupt(format!("the manifest lists a bad path {:?}", f.path)))?;
        let Some((file, size)) = open_regular(from, &f.path, &what)? else {
            return Err(corrupt(format!("{} is missing", f.path)));
        };
        if size != f.size {
            return Err(corrupt(format!(
                "{} has {size} bytes, the manifest says {}",
                f.path, f.size
            )));
        }
        let mut out = create_in(into, &rel)?;
        std::io::copy(&mut file.take(f.size), &mut out).map_err(io("copy", &from.join(&rel)))?;
    }
    Ok(())
}

/// A new file at `rel` inside the directory `into`, with its parent directories: never
/// one that exists (a file listed twice), never through a link.
fn create_in(into: &Path, rel: &Path) -> Result<std::fs::File, CheckpointError> {
    let dst = into.join(rel);
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).map_err(io("create", parent))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&dst)
        .map_err(io("create", &dst))
}

fn copy_tree(from: &Path, to: &Path) -> Result<u64, CheckpointError> {
    let mut total = 0;
    for entry in std::fs::read_dir(from).map_err(io("read", from))? {
        let entry = entry.map_err(io("read", from))?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let kind = entry.file_type().map_err(io("read", &src))?;
        if kind.is_dir() {
            std::fs::create_dir(&dst).map_err(io("create", &dst))?;
            total += copy_tree(&src, &dst)?;
        } else if kind.is_file() {
            total += std::fs::copy(&src, &dst).map_err(io("copy", &src))?;
        } else {
            return Err(CheckpointError::Corrupt {
                what: format!("{:?}", from.display().to_string()),
                reason: format!(
                    "{} is not a regular file or directory",
                    entry.file_name().to_string_lossy()
                ),
            });
        }
    }
    Ok(total)
}

/// Most bytes a manifest may have (its spec and file list), and its seal.
const MAX_MANIFEST: u64 = 16 << 20;
const MAX_SEAL: u64 = 1024;
/// Most directory entries an imported archive may have (warren's exports have none).
const MAX_DIRECTORY_ENTRIES: usize = 4096;

/// Unpacks a checkpoint tar (plain or gzip, told by its first bytes) into the empty
/// directory `into`. It must start with the manifest and its seal (as [`export`] writes it),
/// and the seal must be `key`'s, before any payload is unpacked; then only the files the
/// manifest lists, each at most its listed size: an archive that is not a checkpoint of a
/// server holding the key fills no disk. Only regular files and directories, with paths
/// inside `into`. ([`Manifest::verify`] then checks every byte.)
pub fn import(from: &Path, into: &Path, key: &CheckpointKey) -> Result<(), CheckpointError> {
    let what = format!("{:?}", from.display().to_string());
    let corrupt = |reason: String| CheckpointError::Corrupt {
        what: what.clone(),
        reason,
    };
    let mut file = std::fs::File::open(from).map_err(io("open", from))?;
    let mut magic = [0u8; 2];
    let gzip = file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
    let file = std::fs::File::open(from).map_err(io("open", from))?;
    let reader: Box<dyn Read> = if gzip {
        Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    let mut archive = tar::Archive::new(reader);
    // The tar crate's errors quote the header bytes they could not parse: for a file that is
    // not a checkpoint (`restore /etc/shadow`) that is the file's content, so they are not
    // passed on. Raw: PAX and GNU long-name entries are not read (into memory, unbounded)
    // but refused like any entry that is not a file; warren writes none.
    let entries = archive
        .entries()
        .map_err(|_| corrupt("it is not a tar archive".to_string()))?
        .raw(true);
    // The manifest and seal as read, until both are in and checked; then the listed sizes.
    let (mut manifest_bytes, mut seal) = (None::<Vec<u8>>, None::<Vec<u8>>);
    let mut listed: Option<BTreeMap<String, u64>> = None;
    let mut unpacked = std::collections::HashSet::new();
    let mut directories = 0usize;
    for entry in entries {
        let mut entry = entry.map_err(|_| {
            corrupt("it is not a checkpoint archive (a tar header is not valid)".to_string())
        })?;
        let path = entry
            .path()
            .map_err(|_| corrupt("a tar entry's name is not valid".to_string()))?
            .into_owned();
        let kind = entry.header().entry_type();
        if !matches!(kind, tar::EntryType::Regular | tar::EntryType::Directory) {
            return Err(corrupt(format!(
                "entry {:?} is a {kind:?}, not a file or directory",
                path.display().to_string()
            )));
        }
        let rel: PathBuf = path
            .components()
            .filter(|c| !matches!(c, Component::CurDir))
            .collect();
        if rel.as_os_str().is_empty() {
            continue;
        }
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(corrupt(format!(
                "entry {:?} leaves the checkpoint",
                path.display().to_string()
            )));
        }
        match entry.header().entry_type() {
            // Files' directories are made as they come; an archive of nothing but directory
            // entries (cheap to compress) is not walked for ever.
            tar::EntryType::Directory => {
                directories += 1;
                if directories > MAX_DIRECTORY_ENTRIES {
                    return Err(corrupt(format!(
                        "it has more than {MAX_DIRECTORY_ENTRIES} directory entries"
                    )));
                }
            }
            tar::EntryType::Regular => {
                let name = slash_path(&rel);
                let size = entry.header().size().unwrap_or(u64::MAX);
                if !unpacked.insert(name.clone()) {
                    return Err(corrupt(format!("{name} appears twice")));
                }
                let Some(listed) = &listed else {
                    // Before the seal is checked: only the manifest and the seal, in memory.
                    let (slot, max) = match name.as_str() {
                        MANIFEST => (&mut manifest_bytes, MAX_MANIFEST),
                        SEAL => (&mut seal, MAX_SEAL),
                        _ => {
                            return Err(CheckpointError::Untrusted {
                                what: what.clone(),
                                reason: "is not sealed (its archive does not start with manifest.json and manifest.mac)",
                                key: key.path().display().to_string(),
                            });
                        }
                    };
                    if size > max {
                        return Err(corrupt(format!("{name} has {size} bytes, more than {max}")));
                    }
                    let mut bytes = Vec::new();
                    (&mut entry)
                        .take(max)
                        .read_to_end(&mut bytes)
                        .map_err(|e| corrupt(format!("{name} is cut short or unreadable: {e}")))?;
                    *slot = Some(bytes);
                    if let (Some(m), Some(s)) = (&manifest_bytes, &seal) {
                        Manifest::check_seal(m, s, &what, key)?;
                        let manifest = Manifest::parse(m, &what)?;
                        for (file, bytes) in [(MANIFEST, m), (SEAL, s)] {
                            let dst = into.join(file);
                            std::fs::write(&dst, bytes).map_err(io("write", &dst))?;
                        }
                        listed = Some(
                            manifest
                                .files
                                .iter()
                                .map(|f| (f.path.clone(), f.size))
                                .collect(),
                        );
                    }
                    continue;
                };
                match listed.get(&name) {
                    None => return Err(corrupt(format!("{name} is not in the manifest"))),
                    Some(&want) if size != want => {
                        return Err(corrupt(format!(
                            "{name} has {size} bytes, the manifest says {want}"
                        )));
                    }
                    Some(_) => {}
                }
                let mut out = create_in(into, &rel)?;
                std::io::copy(&mut (&mut entry).take(size), &mut out)
                    .map_err(|e| corrupt(format!("{name} is cut short or unreadable: {e}")))?;
            }
            other => {
                return Err(corrupt(format!(
                    "entry {} is a {other:?}, not a file or directory",
                    slash_path(&rel)
                )));
            }
        }
    }
    if listed.is_none() {
        return Err(match manifest_bytes {
            None => corrupt(format!("it has no {MANIFEST}")),
            Some(_) => CheckpointError::Untrusted {
                what,
                reason: "is not sealed (it has no manifest.mac)",
                key: key.path().display().to_string(),
            },
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
