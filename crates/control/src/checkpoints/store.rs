//! Where the server keeps checkpoints, and what makes one trustworthy.
//!
//! A checkpoint is a directory: the backend's payload (for linux: CRIU's images, the root
//! filesystem's changes, the output so far) and `manifest.json` ([`Manifest`]): the source
//! sandbox's spec and resources, its backend, when it was taken, the engine (CRIU's version),
//! the payload's size, and the size and SHA-256 of every payload file with a digest over that
//! list. [`Manifest::verify`] checks all of it before a restore uses a byte, so a corrupt or
//! truncated checkpoint is refused before anything is created.
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

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use warren_spec::{BackendKind, ResourceInfo, SandboxSpec};

/// The manifest's file name in a checkpoint directory.
pub const MANIFEST: &str = "manifest.json";
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

/// Every file under `dir` but the manifest, relative and sorted. Anything but regular files
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
                if path != Path::new(MANIFEST) {
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
    /// Lists and digests the payload in `dir` and writes `manifest.json` there.
    pub fn seal(dir: &Path, base: ManifestBase) -> Result<Manifest, CheckpointError> {
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
        let path = dir.join(MANIFEST);
        std::fs::write(&path, bytes).map_err(io("write", &path))?;
        Ok(manifest)
    }

    /// Reads `dir/manifest.json` without checking the payload (for listings).
    pub fn read(dir: &Path, what: &str) -> Result<Manifest, CheckpointError> {
        let path = dir.join(MANIFEST);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CheckpointError::Corrupt {
                    what: what.to_string(),
                    reason: format!("it has no {MANIFEST}"),
                });
            }
            Err(e) => return Err(io("read", &path)(e)),
        };
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Corrupt {
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

    /// Reads the manifest and checks every payload file against it: present, of its size
    /// and SHA-256, nothing missing or extra, and the list's digest.
    pub fn verify(dir: &Path, what: &str) -> Result<Manifest, CheckpointError> {
        let manifest = Self::read(dir, what)?;
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
    /// Opens (creating) the store and removes what an interrupted write left.
    pub fn open(root: &Path) -> Result<CheckpointStore, CheckpointError> {
        std::fs::create_dir_all(root).map_err(io("create", root))?;
        for entry in std::fs::read_dir(root).map_err(io("read", root))?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(CheckpointStore {
            root: root.to_path_buf(),
            in_use: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.in_use.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn root(&self) -> &Path {
        &self.root
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
    let tmp = to.with_file_name(format!(
        ".{}.part",
        to.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let written = (|| {
        let file = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
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
        let mut out = archive.into_inner().map_err(io("write", &tmp))?;
        out.flush().map_err(io("write", &tmp))?;
        drop(out);
        std::fs::rename(&tmp, to).map_err(io("write", to))?;
        std::fs::metadata(to)
            .map(|m| m.len())
            .map_err(io("read", to))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
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
        let m = Manifest::seal(&dir, base("c1")).unwrap();
        assert_eq!(m.size, 5002);
        assert_eq!(m.files.len(), 2);
        assert_eq!(m.criu_version.as_deref(), Some("4.1.1"));
        assert_eq!(Manifest::verify(&dir, "c1").unwrap(), m);

        // One byte changed.
        let pages = dir.join("images/pages-1.img");
        let mut bytes = std::fs::read(&pages).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&pages, &bytes).unwrap();
        let err = Manifest::verify(&dir, "c1").unwrap_err().to_string();
        assert!(err.contains("images/pages-1.img has sha256"), "{err}");
        bytes[100] ^= 1;
        // Truncated.
        std::fs::write(&pages, &bytes[..4000]).unwrap();
        let err = Manifest::verify(&dir, "c1").unwrap_err().to_string();
        assert!(
            err.contains("has 4000 bytes, the manifest says 5000"),
            "{err}"
        );
        std::fs::write(&pages, &bytes).unwrap();
        // Missing and extra files.
        std::fs::remove_file(dir.join("linux.json")).unwrap();
        let err = Manifest::verify(&dir, "c1").unwrap_err().to_string();
        assert!(err.contains("linux.json is missing"), "{err}");
        std::fs::write(dir.join("linux.json"), b"{}").unwrap();
        std::fs::write(dir.join("images/extra.img"), b"x").unwrap();
        let err = Manifest::verify(&dir, "c1").unwrap_err().to_string();
        assert!(
            err.contains("images/extra.img is not in the manifest"),
            "{err}"
        );
        std::fs::remove_file(dir.join("images/extra.img")).unwrap();
        assert!(Manifest::verify(&dir, "c1").is_ok());
        // A manifest whose list was edited without its digest.
        let mut edited = m.clone();
        edited.files[0].size += 1;
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&edited).unwrap()).unwrap();
        let err = Manifest::verify(&dir, "c1").unwrap_err().to_string();
        assert!(err.contains("its file list has digest"), "{err}");
        // A truncated manifest.
        std::fs::write(dir.join(MANIFEST), b"{\"format\":1,").unwrap();
        let err = Manifest::verify(&dir, "c1").unwrap_err().to_string();
        assert!(
            err.starts_with("checkpoint c1 is corrupt or incomplete: manifest.json:"),
            "{err}"
        );
    }

    #[test]
    fn store_publish_list_lease_delete() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(CheckpointStore::open(&tmp.path().join("ck")).unwrap());
        let scratch = store.scratch().unwrap();
        payload(&scratch.path);
        Manifest::seal(&scratch.path, base("one")).unwrap();
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
        let m = Manifest::seal(&dir, base("c")).unwrap();
        for name in ["x.tar", "x.tar.gz"] {
            let out = tmp.path().join(name);
            export(&dir, &out).unwrap();
            let into = tmp.path().join(format!("in-{name}"));
            std::fs::create_dir(&into).unwrap();
            import(&out, &into).unwrap();
            assert_eq!(Manifest::verify(&into, name).unwrap(), m);
            // Truncated archives: refused by the unpack or by the verify.
            let bytes = std::fs::read(&out).unwrap();
            let cut = tmp.path().join(format!("cut-{name}"));
            std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
            let into = tmp.path().join(format!("cut-in-{name}"));
            std::fs::create_dir(&into).unwrap();
            let refused =
                import(&cut, &into).and_then(|()| Manifest::verify(&into, name).map(|_| ()));
            assert!(refused.is_err(), "{name}");
        }
        let out = tmp.path().join("copy");
        export(&dir, &out).unwrap();
        assert_eq!(Manifest::verify(&out, "copy").unwrap(), m);
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
