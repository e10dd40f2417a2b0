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
    /// Reads the key at `path`, or makes a new one there if there is no file.
    pub fn load_or_create(path: &Path) -> Result<CheckpointKey, CheckpointError> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
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
                        "it must hold 64 hex digits (32 random bytes, e.g. `openssl rand -hex 32`), it holds {} bytes that are not",
                        bytes.len()
                    ))
                })?;
                Ok(CheckpointKey {
                    key,
                    path: path.to_path_buf(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                std::fs::File::open("/dev/urandom")
                    .and_then(|mut r| r.read_exact(&mut key))
                    .map_err(|e| bad(format!("no random bytes for a new key: {e}")))?;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io("create", path))?;
                file.write_all(format!("{}\n", hex::encode(key)).as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(io("write", path))?;
                tracing::info!(path = %path.display(), "made a new checkpoint key");
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
        let path = dir.join(MANIFEST);
        match std::fs::read(&path) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(CheckpointError::Corrupt {
                what: what.to_string(),
                reason: format!("it has no {MANIFEST}"),
            }),
            Err(e) => Err(io("read", &path)(e)),
        }
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
        let seal_path = dir.join(SEAL);
        let seal = match std::fs::read(&seal_path) {
            Ok(seal) => seal,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(untrusted("is not sealed (it has no manifest.mac)"));
            }
            Err(e) => return Err(io("read", &seal_path)(e)),
        };
        if !key.check(&bytes, &String::from_utf8_lossy(&seal)) {
            return Err(untrusted(
                "has a seal made with another key, or a manifest changed after sealing",
            ));
        }
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

/// A manifest path as a relative path inside the checkpoint, or `None` if it leaves it.
fn safe_relative(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    if path.is_empty() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    Some(p.to_path_buf())
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
        for entry in std::fs::read_dir(root).map_err(io("read", root))?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
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
    if !is_archive(to) {
        std::fs::create_dir_all(to).map_err(io("create", to))?;
        let copied = copy_tree(dir, to);
        if copied.is_err() {
            let _ = std::fs::remove_dir_all(to);
        }
        return copied;
    }
    // A new file of a random name beside the output (O_EXCL, never through a link), linked
    // to its name only once complete and only if that name is still free.
    let parent = to.parent().unwrap_or(Path::new("/"));
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
        archive
            .append_dir_all(".", dir)
            .map_err(io("archive", dir))?;
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
/// copy of a checkpoint given by path). Like [`import`], only regular files and directories.
pub fn copy_in(from: &Path, into: &Path) -> Result<(), CheckpointError> {
    copy_tree(from, into).map(|_| ())
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

/// Unpacks a checkpoint tar (plain or gzip, told by its first bytes) into the empty
/// directory `into`. Only regular files and directories are accepted, with paths inside it.
pub fn import(from: &Path, into: &Path) -> Result<(), CheckpointError> {
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
    // passed on.
    let entries = archive
        .entries()
        .map_err(|_| corrupt("it is not a tar archive".to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|_| {
            corrupt("it is not a checkpoint archive (a tar header is not valid)".to_string())
        })?;
        let path = entry
            .path()
            .map_err(|_| corrupt("a tar entry's name is not valid".to_string()))?
            .into_owned();
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
        let dst = into.join(&rel);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(&dst).map_err(io("create", &dst))?;
            }
            tar::EntryType::Regular => {
                if let Some(parent) = dst.parent() {
                    std::fs::create_dir_all(parent).map_err(io("create", parent))?;
                }
                let mut out = std::fs::File::create(&dst).map_err(io("create", &dst))?;
                std::io::copy(&mut entry, &mut out).map_err(|e| {
                    corrupt(format!(
                        "{} is cut short or unreadable: {e}",
                        slash_path(&rel)
                    ))
                })?;
            }
            other => {
                return Err(corrupt(format!(
                    "entry {} is a {other:?}, not a file or directory",
                    slash_path(&rel)
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(name: &str) -> ManifestBase {
        ManifestBase {
            name: name.into(),
            sandbox: "web".into(),
            sandbox_id: "abc".into(),
            backend: BackendKind::Linux,
            spec: SandboxSpec {
                name: "web".into(),
                ..Default::default()
            },
            resources: ResourceInfo::default(),
            created_at_ms: 1,
            leave_running: false,
            engine: BTreeMap::from([("criuVersion".to_string(), "4.1.1".to_string())]),
        }
    }

    fn key() -> CheckpointKey {
        CheckpointKey::from_bytes([7; 32], Path::new("/srv/warren/checkpoint.key"))
    }

    /// Writes `bytes` as the manifest, sealed with the test key (a checkpoint whose
    /// writer had the key).
    fn reseal(dir: &Path, bytes: &[u8]) {
        std::fs::write(dir.join(MANIFEST), bytes).unwrap();
        std::fs::write(dir.join(SEAL), key().seal(bytes)).unwrap();
    }

    fn payload(dir: &Path) {
        std::fs::create_dir_all(dir.join("images")).unwrap();
        std::fs::write(dir.join("images/pages-1.img"), vec![7u8; 5000]).unwrap();
        std::fs::write(dir.join("linux.json"), b"{}").unwrap();
    }

    #[test]
    fn seal_then_verify_and_every_kind_of_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        payload(&dir);
        let m = Manifest::seal(&dir, base("c1"), &key()).unwrap();
        assert_eq!(m.size, 5002);
        assert_eq!(m.files.len(), 2);
        assert_eq!(m.criu_version.as_deref(), Some("4.1.1"));
        assert_eq!(Manifest::verify(&dir, "c1", &key()).unwrap(), m);

        // One byte changed.
        let pages = dir.join("images/pages-1.img");
        let mut bytes = std::fs::read(&pages).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&pages, &bytes).unwrap();
        let err = Manifest::verify(&dir, "c1", &key())
            .unwrap_err()
            .to_string();
        assert!(err.contains("images/pages-1.img has sha256"), "{err}");
        bytes[100] ^= 1;
        // Truncated.
        std::fs::write(&pages, &bytes[..4000]).unwrap();
        let err = Manifest::verify(&dir, "c1", &key())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("has 4000 bytes, the manifest says 5000"),
            "{err}"
        );
        std::fs::write(&pages, &bytes).unwrap();
        // Missing and extra files.
        std::fs::remove_file(dir.join("linux.json")).unwrap();
        let err = Manifest::verify(&dir, "c1", &key())
            .unwrap_err()
            .to_string();
        assert!(err.contains("linux.json is missing"), "{err}");
        std::fs::write(dir.join("linux.json"), b"{}").unwrap();
        std::fs::write(dir.join("images/extra.img"), b"x").unwrap();
        let err = Manifest::verify(&dir, "c1", &key())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("images/extra.img is not in the manifest"),
            "{err}"
        );
        std::fs::remove_file(dir.join("images/extra.img")).unwrap();
        assert!(Manifest::verify(&dir, "c1", &key()).is_ok());
        // A manifest whose list was edited without its digest (by someone with the key).
        let mut edited = m.clone();
        edited.files[0].size += 1;
        reseal(&dir, &serde_json::to_vec(&edited).unwrap());
        let err = Manifest::verify(&dir, "c1", &key())
            .unwrap_err()
            .to_string();
        assert!(err.contains("its file list has digest"), "{err}");
        // A truncated manifest.
        reseal(&dir, b"{\"format\":1,");
        let err = Manifest::verify(&dir, "c1", &key())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("checkpoint c1 is corrupt or incomplete: manifest.json:"),
            "{err}"
        );
    }

    #[test]
    fn only_a_seal_made_with_the_servers_key_is_trusted() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        payload(&dir);
        let m = Manifest::seal(&dir, base("c1"), &key()).unwrap();
        let seal = std::fs::read_to_string(dir.join(SEAL)).unwrap();
        assert!(seal.starts_with("hmac-sha256:"), "{seal}");
        assert_eq!(Manifest::verify(&dir, "c1", &key()).unwrap(), m);

        // Another server's key.
        let other = CheckpointKey::from_bytes([8; 32], Path::new("/other.key"));
        let err = Manifest::verify(&dir, "c1", &other).unwrap_err();
        assert!(matches!(err, CheckpointError::Untrusted { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("has a seal made with another key") && msg.contains("/other.key"),
            "{msg}"
        );

        // A crafted manifest with a matching digest: a new spec and payload, the list and
        // its digest recomputed, but no key to seal it with.
        let mut crafted = m.clone();
        crafted.spec.command = vec!["/bin/evil".into()];
        std::fs::write(dir.join("linux.json"), b"{\"evil\":1}").unwrap();
        crafted.files = payload_files(&dir, "c1")
            .unwrap()
            .iter()
            .map(|rel| file_entry(&dir, rel).unwrap())
            .collect();
        crafted.digest = list_digest(&crafted.files);
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&crafted).unwrap()).unwrap();
        let err = Manifest::verify(&dir, "c1", &key())
            .unwrap_err()
            .to_string();
        assert!(err.contains("a manifest changed after sealing"), "{err}");
        // The same with a seal of garbage, and with none.
        std::fs::write(dir.join(SEAL), b"hmac-sha256:zz").unwrap();
        assert!(matches!(
            Manifest::verify(&dir, "c1", &key()),
            Err(CheckpointError::Untrusted { .. })
        ));
        std::fs::remove_file(dir.join(SEAL)).unwrap();
        let err = Manifest::verify(&dir, "c1", &key())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is not sealed (it has no manifest.mac)"),
            "{err}"
        );
    }

    #[test]
    fn a_key_file_is_made_once_private_and_must_be_hex() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("checkpoint.key");
        let made = CheckpointKey::load_or_create(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64, "{text:?}");
        let again = CheckpointKey::load_or_create(&path).unwrap();
        assert_eq!(again.key, made.key);
        assert_ne!(made.key, [0u8; 32]);
        // The key never shows in debug output.
        assert!(!format!("{made:?}").contains(text.trim()));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = CheckpointKey::load_or_create(&path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("others may read or write it (mode 0644)"),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "not hex\n").unwrap();
        let err = CheckpointKey::load_or_create(&path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("it must hold 64 hex digits"), "{err}");
        assert!(!err.contains("not hex"), "the content is not echoed: {err}");
    }

    #[test]
    fn store_publish_list_lease_delete() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(CheckpointStore::open(&tmp.path().join("ck"), key()).unwrap());
        let scratch = store.scratch().unwrap();
        payload(&scratch.path);
        Manifest::seal(&scratch.path, base("one"), &key()).unwrap();
        let dir = store.publish(scratch, "one").unwrap();
        assert!(dir.join(MANIFEST).is_file());
        let dropped = store.scratch().unwrap();
        let left = dropped.path.clone();
        drop(dropped);
        assert!(!left.exists());
        assert!(matches!(
            store.check_free("one"),
            Err(CheckpointError::AlreadyExists { .. })
        ));
        assert!(matches!(
            store.check_free("../x"),
            Err(CheckpointError::Invalid(_))
        ));
        let names: Vec<String> = store
            .list()
            .unwrap()
            .into_iter()
            .map(|(_, m)| m.name)
            .collect();
        assert_eq!(names, vec!["one"]);
        let lease = store.lease("one").unwrap();
        assert!(matches!(
            store.delete("one"),
            Err(CheckpointError::InUse { .. })
        ));
        drop(lease);
        assert!(store.delete("one").unwrap().is_some());
        assert!(matches!(
            store.delete("one"),
            Err(CheckpointError::NotFound { .. })
        ));
    }

    #[test]
    fn outputs_that_are_links_or_unknown_archives_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dangling = tmp.path().join("dangling");
        std::os::unix::fs::symlink(tmp.path().join("nowhere"), &dangling).unwrap();
        let err = check_output(&dangling).unwrap_err().to_string();
        assert!(err.contains("is a symlink"), "{err}");
        let to_dir = tmp.path().join("to-dir");
        std::os::unix::fs::symlink(tmp.path(), &to_dir).unwrap();
        assert!(check_output(&to_dir).is_err());
        let err = check_output(&tmp.path().join("x.zip"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ends in .zip: the output is a directory, or a .tar"),
            "{err}"
        );
        for fine in ["x.tar", "x.tar.gz", "x.tgz", "plain-dir"] {
            check_output(&tmp.path().join(fine)).unwrap();
        }
    }

    #[test]
    fn export_and_import_as_tar_gzip_and_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        payload(&dir);
        let m = Manifest::seal(&dir, base("c"), &key()).unwrap();
        for name in ["x.tar", "x.tar.gz"] {
            let out = tmp.path().join(name);
            export(&dir, &out).unwrap();
            let into = tmp.path().join(format!("in-{name}"));
            std::fs::create_dir(&into).unwrap();
            import(&out, &into).unwrap();
            assert_eq!(Manifest::verify(&into, name, &key()).unwrap(), m);
            // Truncated archives: refused by the unpack or by the verify.
            let bytes = std::fs::read(&out).unwrap();
            let cut = tmp.path().join(format!("cut-{name}"));
            std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
            let into = tmp.path().join(format!("cut-in-{name}"));
            std::fs::create_dir(&into).unwrap();
            let refused = import(&cut, &into)
                .and_then(|()| Manifest::verify(&into, name, &key()).map(|_| ()));
            assert!(refused.is_err(), "{name}");
        }
        let out = tmp.path().join("copy");
        export(&dir, &out).unwrap();
        assert_eq!(Manifest::verify(&out, "copy", &key()).unwrap(), m);
        assert!(
            export(&dir, &out).is_err(),
            "a non-empty directory is refused"
        );
        assert!(export(&dir, Path::new("rel.tar")).is_err());
    }

    #[test]
    fn hostile_archives_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let evil = tmp.path().join("evil.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&evil).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_link_name("/etc/passwd").unwrap();
        b.append_data(&mut h, "link", std::io::empty()).unwrap();
        b.finish().unwrap();
        drop(b);
        let into = tmp.path().join("in");
        std::fs::create_dir(&into).unwrap();
        let err = import(&evil, &into).unwrap_err().to_string();
        assert!(err.contains("not a file or directory"), "{err}");
        std::fs::write(
            tmp.path().join("junk.tar"),
            b"not a tar at all, just some words",
        )
        .unwrap();
        assert!(import(&tmp.path().join("junk.tar"), &into).is_err());
    }
}
