//! The store's files: blobs, unpacked layers, the name index, locks and garbage collection.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{ImageError, io_err};
use crate::oci::{self, ConfigFile, Manifest};
use crate::reference::{Digest, Reference};
use crate::{FileIdentity, Image, ImageConfig, ImageKind, ImageSummary, unpack};

const INDEX_VERSION: u32 = 1;
/// Manifests, indexes and configs are small; refuse to read a "JSON" blob larger than this.
pub(crate) const MAX_JSON_BLOB: u64 = 16 << 20;

/// A handle on an image store directory. Cheap to clone; all clones (and other processes
/// opening the same directory) see the same store.
#[derive(Debug, Clone)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    /// The last `index.json` read, with the stamp of the file it came from: readers (every
    /// create resolves its image; pools and `warren info` list) parse it again only when the
    /// file changed. Writes go through a temp file and a rename, so a changed index is a new
    /// file.
    index: std::sync::Mutex<Option<(FileIdentity, Arc<IndexFile>)>>,
}

/// What [`ImageStore::gc`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcStats {
    pub blobs: usize,
    pub layers: usize,
    /// Leftovers of interrupted imports or pulls.
    pub temp: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct IndexFile {
    version: u32,
    images: BTreeMap<String, ImageRecord>,
}

impl Default for IndexFile {
    fn default() -> Self {
        IndexFile {
            version: INDEX_VERSION,
            images: BTreeMap::new(),
        }
    }
}

/// One image as recorded in the index: enough to list and resolve it without reading blobs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ImageRecord {
    pub names: Vec<String>,
    pub config: String,
    #[serde(default)]
    pub created: Option<String>,
    pub layers: Vec<LayerRecord>,
    pub image_config: ImageConfig,
    /// The module blob of a Wasm artifact (whose `layers` is then empty). Absent from records
    /// written before Wasm artifacts were supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm: Option<WasmRecord>,
}

/// The one layer of a Wasm artifact: kept as a blob, never unpacked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WasmRecord {
    pub digest: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LayerRecord {
    /// Digest of the compressed blob.
    pub digest: String,
    /// Digest of the uncompressed tar: names the unpacked directory.
    pub diff_id: String,
    pub size: u64,
}

impl ImageRecord {
    /// Builds the record of a manifest from its config blob (already checked against its
    /// digest). A Wasm artifact's config is read leniently: only `created` is used.
    pub fn new(
        manifest: &Manifest,
        config_bytes: &[u8],
        what: &str,
    ) -> Result<ImageRecord, ImageError> {
        let config_what = format!("config {}", manifest.config.digest);
        if let Some(module) = manifest.wasm_layer(what)? {
            return Ok(ImageRecord {
                names: Vec::new(),
                config: manifest.config.digest()?.to_string(),
                created: oci::wasm_config_created(config_bytes, &config_what)?,
                layers: Vec::new(),
                image_config: ImageConfig::default(),
                wasm: Some(WasmRecord {
                    digest: module.digest()?.to_string(),
                    size: module.declared_size().unwrap_or(0),
                }),
            });
        }
        let config: ConfigFile =
            serde_json::from_slice(config_bytes).map_err(|e| ImageError::json(config_what, e))?;
        manifest.validate(&config, what)?;
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for (descriptor, diff_id) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
            layers.push(LayerRecord {
                digest: descriptor.digest()?.to_string(),
                diff_id: Digest::parse(diff_id)?.to_string(),
                size: descriptor.declared_size().unwrap_or(0),
            });
        }
        let container = config.config.clone().unwrap_or_default();
        Ok(ImageRecord {
            names: Vec::new(),
            config: manifest.config.digest()?.to_string(),
            created: config.created.clone(),
            layers,
            image_config: ImageConfig {
                entrypoint: container.entrypoint.unwrap_or_default(),
                cmd: container.cmd.unwrap_or_default(),
                env: container.env.unwrap_or_default(),
                working_dir: container.working_dir.filter(|d| !d.is_empty()),
                user: container.user.filter(|u| !u.is_empty()),
            },
            wasm: None,
        })
    }

    fn summary(&self, id: &str) -> ImageSummary {
        let wasm_size = self.wasm.as_ref().map_or(0, |w| w.size);
        ImageSummary {
            id: id.to_string(),
            names: self.names.clone(),
            size: self
                .layers
                .iter()
                .fold(wasm_size, |sum, l| sum.saturating_add(l.size)),
            layers: self.layers.len() + usize::from(self.wasm.is_some()),
            created: self.created.clone(),
            kind: if self.wasm.is_some() {
                ImageKind::Wasm
            } else {
                ImageKind::Container
            },
        }
    }
}

/// A held flock(2); released on drop.
#[derive(Debug)]
pub(crate) struct LockGuard {
    _file: File,
}

/// A directory under `tmp/` removed on drop (unless renamed away first).
#[derive(Debug)]
pub(crate) struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove temporary directory");
        }
    }
}

/// How a lookup string matched.
enum Match {
    Name { id: String, name: String },
    Id(String),
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

impl ImageStore {
    /// Opens (creating if missing) the image store in `dir`, e.g. `<server-dir>/images`.
    pub fn open(dir: &Path) -> Result<ImageStore, ImageError> {
        for sub in [
            dir.to_path_buf(),
            dir.join("blobs/sha256"),
            dir.join("layers"),
            dir.join("tmp"),
        ] {
            fs::create_dir_all(&sub).map_err(io_err!("creating", &sub))?;
        }
        // Layers keep their files' owners and modes, set-id bits included, and images may
        // hold secrets: only root may look inside (as /var/lib/docker is 0710).
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err!("restricting", dir))?;
        let root = fs::canonicalize(dir).map_err(io_err!("resolving", dir))?;
        Ok(ImageStore {
            inner: Arc::new(Inner {
                root,
                index: std::sync::Mutex::new(None),
            }),
        })
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    pub(crate) fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root().join("blobs/sha256").join(digest.hex())
    }

    fn layer_path(&self, diff_id: &Digest) -> PathBuf {
        self.root().join("layers").join(diff_id.hex())
    }

    /// A fresh, unused name under `tmp/`.
    pub(crate) fn temp_path(&self, prefix: &str) -> PathBuf {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        self.root()
            .join("tmp")
            .join(format!("{prefix}-{}-{n}-{nanos}", std::process::id()))
    }

    pub(crate) fn temp_dir(&self, prefix: &str) -> Result<TempDir, ImageError> {
        let path = self.temp_path(prefix);
        fs::create_dir(&path).map_err(io_err!("creating", &path))?;
        Ok(TempDir { path })
    }

    pub(crate) fn has_layer(&self, diff_id: &Digest) -> bool {
        self.layer_path(diff_id).is_dir()
    }

    pub(crate) fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Whether the blob `digest` is stored, checked against the size a descriptor declares
    /// for it: a stored blob is not read again, so a manifest could otherwise record any size
    /// for a layer the store already has.
    pub(crate) fn has_blob_of_size(
        &self,
        digest: &Digest,
        declared: Option<u64>,
    ) -> Result<bool, ImageError> {
        let path = self.blob_path(digest);
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => {
                verify_size(digest, declared, meta.len())?;
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(ImageError::io("reading", path, e)),
        }
    }

    /// Stores a small blob held in memory, after checking it against `digest`.
    pub(crate) fn put_blob_bytes(&self, digest: &Digest, bytes: &[u8]) -> Result<(), ImageError> {
        verify_digest("blob", digest, &sha256_hex(bytes))?;
        if self.has_blob(digest) {
            return Ok(());
        }
        let tmp = self.temp_path("blob");
        let write = || -> io::Result<()> {
            let mut file = File::create(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()
        };
        write().map_err(io_err!("writing", &tmp))?;
        self.commit_blob(&tmp, digest)
    }

    /// Copies a blob from `reader` into the store, hashing as it goes; the blob lands only if
    /// it matches `digest` (and `expected_size`, when known).
    pub(crate) fn put_blob_reader(
        &self,
        digest: &Digest,
        expected_size: Option<u64>,
        reader: &mut dyn Read,
        source: &Path,
    ) -> Result<(), ImageError> {
        let tmp = self.temp_path("blob");
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let result = (|| -> Result<(), ImageError> {
            let mut file = File::create(&tmp).map_err(io_err!("creating", &tmp))?;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(ImageError::io("reading", source, e)),
                };
                hasher.update(&buf[..n]);
                size += n as u64;
                file.write_all(&buf[..n])
                    .map_err(io_err!("writing", &tmp))?;
            }
            file.sync_all().map_err(io_err!("writing", &tmp))?;
            verify_size(digest, expected_size, size)?;
            verify_digest("blob", digest, &format!("{:x}", hasher.finalize()))?;
            self.commit_blob(&tmp, digest)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Moves a verified temp file into `blobs/`. Replacing an existing blob is harmless: same
    /// digest, same bytes.
    pub(crate) fn commit_blob(&self, tmp: &Path, digest: &Digest) -> Result<(), ImageError> {
        let dest = self.blob_path(digest);
        fs::rename(tmp, &dest).map_err(|e| {
            let _ = fs::remove_file(tmp);
            ImageError::io("moving blob into place at", &dest, e)
        })?;
        // The name too, before an index that lists the blob is written.
        match dest.parent() {
            Some(blobs) => fs::File::open(blobs)
                .and_then(|d| d.sync_all())
                .map_err(io_err!("flushing the blob directory", blobs)),
            None => Ok(()),
        }
    }

    /// Unpacks a layer unless it already is. Returns whether it did the work.
    pub(crate) fn ensure_layer(&self, layer: &LayerRecord) -> Result<bool, ImageError> {
        let diff_id = Digest::parse(&layer.diff_id)?;
        let dest = self.layer_path(&diff_id);
        if dest.is_dir() {
            return Ok(false);
        }
        let digest = Digest::parse(&layer.digest)?;
        let work = self.temp_dir("layer")?;
        let actual = unpack::unpack_layer(&self.blob_path(&digest), work.path(), &layer.digest)?;
        verify_digest("layer diff_id", &diff_id, actual.hex())?;
        // The layer's files reach the disk before the layer takes its name: after a crash a
        // named layer must be whole, not files whose data was still in the page cache (an
        // extent-delaying file system renames before it writes). One `syncfs` of the store's
        // file system costs far less than an fsync per file of a layer of thousands.
        fs::File::open(work.path())
            .and_then(|dir| rustix::fs::syncfs(&dir).map_err(std::io::Error::from))
            .map_err(io_err!("flushing the unpacked layer at", work.path()))?;
        match fs::rename(work.path(), &dest) {
            Ok(()) => {
                // And the name itself, before an index that lists the layer is written.
                if let Some(layers) = dest.parent() {
                    fs::File::open(layers)
                        .and_then(|d| d.sync_all())
                        .map_err(io_err!("flushing the layer directory", layers))?;
                }
                tracing::debug!(layer = %layer.digest, diff_id = %diff_id, "unpacked layer");
                Ok(true)
            }
            // Another import unpacked the same layer first; ours is dropped with `work`.
            Err(e) if e.raw_os_error().is_some_and(is_exists_error) => Ok(false),
            Err(e) => Err(ImageError::io(
                "moving unpacked layer into place at",
                dest,
                e,
            )),
        }
    }

    fn lock(&self, name: &str, operation: FlockOperation) -> Result<Option<LockGuard>, ImageError> {
        let path = self.root().join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err!("opening lock file", &path))?;
        loop {
            match rustix::fs::flock(&file, operation) {
                Ok(()) => return Ok(Some(LockGuard { _file: file })),
                Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(ImageError::io("locking", path, e.into())),
            }
        }
    }

    fn lock_blocking(
        &self,
        name: &str,
        operation: FlockOperation,
    ) -> Result<LockGuard, ImageError> {
        self.lock(name, operation)?.ok_or_else(|| {
            ImageError::io(
                "locking",
                self.root().join(name),
                io::Error::from(io::ErrorKind::WouldBlock),
            )
        })
    }

    /// Held by an import or pull from its first write until its image is registered.
    pub(crate) fn lock_gc_shared(&self) -> Result<LockGuard, ImageError> {
        self.lock_blocking("gc.lock", FlockOperation::LockShared)
    }

    /// The index as it is on disk now, for readers: parsed again only when the file changed
    /// since the last read (one `stat` otherwise).
    fn current_index(&self) -> Result<Arc<IndexFile>, ImageError> {
        let path = self.root().join("index.json");
        let stamp = match FileIdentity::of(&path) {
            Ok(stamp) => stamp,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Arc::new(IndexFile::default()));
            }
            Err(e) => return Err(ImageError::io("reading", path, e)),
        };
        let cache = || {
            self.inner
                .index
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some((cached, index)) = cache().as_ref()
            && *cached == stamp
        {
            return Ok(Arc::clone(index));
        }
        let (stamp, index) = self.read_index()?;
        let index = Arc::new(index);
        if let Some(stamp) = stamp {
            *cache() = Some((stamp, Arc::clone(&index)));
        }
        Ok(index)
    }

    /// The index read from disk, for a writer (under `index.lock`).
    fn load_index(&self) -> Result<IndexFile, ImageError> {
        Ok(self.read_index()?.1)
    }

    /// Reads and checks `index.json`, with the stamp of the file read (`None`: there is none,
    /// an empty index).
    fn read_index(&self) -> Result<(Option<FileIdentity>, IndexFile), ImageError> {
        let path = self.root().join("index.json");
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok((None, IndexFile::default()));
            }
            Err(e) => return Err(ImageError::io("reading", path, e)),
        };
        // The stamp of the file that is read, taken from its handle: a rename meanwhile
        // cannot pair one version's stamp with another's content.
        let stamp = file
            .metadata()
            .map(|m| FileIdentity::of_metadata(&m))
            .map_err(|e| ImageError::io("reading", path.clone(), e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| ImageError::io("reading", path.clone(), e))?;
        let index: IndexFile = serde_json::from_slice(&bytes).map_err(|e| ImageError::Corrupt {
            path: path.clone(),
            reason: format!("index.json does not parse: {e}"),
        })?;
        if index.version != INDEX_VERSION {
            return Err(ImageError::Corrupt {
                path,
                reason: format!(
                    "index.json has version {} (this build reads {INDEX_VERSION})",
                    index.version
                ),
            });
        }
        Ok((Some(stamp), index))
    }

    fn save_index(&self, index: &IndexFile) -> Result<(), ImageError> {
        let path = self.root().join("index.json");
        let tmp = self
            .root()
            .join(format!("index.json.tmp-{}", std::process::id()));
        let bytes =
            serde_json::to_vec_pretty(index).map_err(|e| ImageError::json("index.json", e))?;
        let write = || -> io::Result<()> {
            let mut file = File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            ImageError::io("writing", &path, e)
        })
    }

    /// Adds (or updates) an image and gives it `names`, taking them from any image that had
    /// them. Its blobs and layers must be in place.
    pub(crate) fn register(
        &self,
        id: &Digest,
        record: ImageRecord,
        names: &[String],
    ) -> Result<ImageSummary, ImageError> {
        let _lock = self.lock_blocking("index.lock", FlockOperation::LockExclusive)?;
        let mut index = self.load_index()?;
        for (other_id, other) in index.images.iter_mut() {
            if other_id != id.as_str() {
                other.names.retain(|n| !names.contains(n));
            }
        }
        let entry = index.images.entry(id.to_string()).or_insert(record);
        for name in names {
            if !entry.names.contains(name) {
                entry.names.push(name.clone());
            }
        }
        entry.names.sort();
        let summary = entry.summary(id.as_str());
        self.save_index(&index)?;
        Ok(summary)
    }

    /// All images, sorted by name (images without names last, by id).
    pub fn list(&self) -> Result<Vec<ImageSummary>, ImageError> {
        let index = self.current_index()?;
        let mut out: Vec<ImageSummary> = index.images.iter().map(|(id, r)| r.summary(id)).collect();
        out.sort_by(|a, b| match (a.names.first(), b.names.first()) {
            (Some(x), Some(y)) => x.cmp(y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.id.cmp(&b.id),
        });
        Ok(out)
    }

    fn find(index: &IndexFile, query: &str) -> Result<Match, ImageError> {
        if index.images.contains_key(query) {
            return Ok(Match::Id(query.to_string()));
        }
        if let Ok(reference) = Reference::parse(query) {
            let name = reference.familiar();
            if let Some((id, _)) = index.images.iter().find(|(_, r)| r.names.contains(&name)) {
                return Ok(Match::Name {
                    id: id.clone(),
                    name,
                });
            }
        }
        let prefix = query.strip_prefix("sha256:").unwrap_or(query);
        if prefix.len() >= 4 && prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            let prefix = prefix.to_ascii_lowercase();
            let matches: Vec<&String> = index
                .images
                .keys()
                .filter(|id| {
                    id.strip_prefix("sha256:")
                        .is_some_and(|hex| hex.starts_with(&prefix))
                })
                .collect();
            match matches.as_slice() {
                [] => {}
                [one] => return Ok(Match::Id((*one).clone())),
                many => {
                    return Err(ImageError::AmbiguousId {
                        prefix: query.to_string(),
                        count: many.len(),
                    });
                }
            }
        }
        let looks_like_id = query.starts_with("sha256:")
            || (query.len() >= 4 && query.bytes().all(|b| b.is_ascii_hexdigit()));
        let shown = match Reference::parse(query) {
            Ok(reference) if !looks_like_id => reference.familiar(),
            // Not a name at all: say what is wrong with it, not that no image has it.
            Err(invalid) if !looks_like_id => return Err(invalid),
            _ => query.to_string(),
        };
        Err(ImageError::NotFound(shown))
    }

    /// Looks up an image by name (`busybox` is `busybox:latest`), full id, or unique id prefix
    /// of at least 4 hex digits (with or without `sha256:`), and returns its unpacked layers
    /// (bottom to top) and config, or for a Wasm artifact its module blob.
    pub fn resolve(&self, name_or_id: &str) -> Result<Image, ImageError> {
        let index = self.current_index()?;
        let id = match Self::find(&index, name_or_id)? {
            Match::Name { id, .. } | Match::Id(id) => id,
        };
        let record = index
            .images
            .get(&id)
            .ok_or_else(|| ImageError::NotFound(name_or_id.to_string()))?;
        let mut layers = Vec::with_capacity(record.layers.len());
        for layer in &record.layers {
            let path = self.layer_path(&Digest::parse(&layer.diff_id)?);
            if !path.is_dir() {
                return Err(ImageError::Corrupt {
                    path: self.root().to_path_buf(),
                    reason: format!(
                        "layer {} of image {id} is missing from layers/ (remove the image and import it again)",
                        layer.diff_id
                    ),
                });
            }
            layers.push(path);
        }
        let wasm = match &record.wasm {
            Some(module) => {
                let path = self.blob_path(&Digest::parse(&module.digest)?);
                if !path.is_file() {
                    return Err(ImageError::Corrupt {
                        path: self.root().to_path_buf(),
                        reason: format!(
                            "the Wasm module {} of image {id} is missing from blobs/ (remove the image and import it again)",
                            module.digest
                        ),
                    });
                }
                Some(path)
            }
            None => None,
        };
        Ok(Image {
            id,
            names: record.names.clone(),
            layers,
            config: record.image_config.clone(),
            wasm,
        })
    }

    /// Removes a name, or, given an image id or unique id prefix, the image with all its names.
    /// Removing an image's last name removes the image. Blobs and layers no longer used by any
    /// image are then deleted (unless an import is running; see the crate docs). Returns the
    /// image with the names that were removed.
    pub fn remove(&self, name_or_id: &str) -> Result<ImageSummary, ImageError> {
        self.remove_as(name_or_id, None)
    }

    /// [`ImageStore::remove`] of what a caller checked: `name_or_id` must still be image
    /// `id`, and the removal may delete it (rather than drop one of its names) only when
    /// `may_delete`. Checked under the index lock, so a pull or import that moves the name
    /// between the caller's check and the removal makes it fail with
    /// [`ImageError::Changed`] instead of deleting an image nobody checked.
    pub fn remove_checked(
        &self,
        name_or_id: &str,
        id: &str,
        may_delete: bool,
    ) -> Result<ImageSummary, ImageError> {
        self.remove_as(name_or_id, Some((id, may_delete)))
    }

    fn remove_as(
        &self,
        name_or_id: &str,
        expected: Option<(&str, bool)>,
    ) -> Result<ImageSummary, ImageError> {
        let summary = {
            let _lock = self.lock_blocking("index.lock", FlockOperation::LockExclusive)?;
            let mut index = self.load_index()?;
            let (id, name) = match Self::find(&index, name_or_id)? {
                Match::Name { id, name } => (id, Some(name)),
                Match::Id(id) => (id, None),
            };
            let Some(record) = index.images.get_mut(&id) else {
                return Err(ImageError::NotFound(name_or_id.to_string()));
            };
            if let Some((expected_id, may_delete)) = expected {
                let deletes = name.is_none() || record.names.len() <= 1;
                if id != expected_id || (deletes && !may_delete) {
                    return Err(ImageError::Changed {
                        name: name_or_id.to_string(),
                    });
                }
            }
            let summary = match name {
                Some(name) if record.names.len() > 1 => {
                    record.names.retain(|n| *n != name);
                    ImageSummary {
                        names: vec![name],
                        ..record.summary(&id)
                    }
                }
                _ => {
                    let summary = record.summary(&id);
                    index.images.remove(&id);
                    summary
                }
            };
            self.save_index(&index)?;
            summary
        };
        match self.lock("gc.lock", FlockOperation::NonBlockingLockExclusive)? {
            Some(guard) => {
                let stats = self.collect(&guard)?;
                tracing::debug!(?stats, "garbage collected");
            }
            None => tracing::debug!("an import is running; garbage collection deferred"),
        }
        Ok(summary)
    }

    /// Deletes blobs and unpacked layers no image uses, and leftovers of interrupted imports.
    /// Waits for running imports and pulls to finish.
    pub fn gc(&self) -> Result<GcStats, ImageError> {
        let guard = self.lock_blocking("gc.lock", FlockOperation::LockExclusive)?;
        self.collect(&guard)
    }

    /// The collection itself; `_exclusive` proves no import is between writing and registering.
    fn collect(&self, _exclusive: &LockGuard) -> Result<GcStats, ImageError> {
        // Only removals can change the index meanwhile, and they only drop references, so this
        // snapshot keeps at least everything still in use. Read from the file, not the cached
        // copy: deleting is the one place where a stale cache would cost data.
        let index = self.load_index()?;
        let mut blobs = BTreeSet::new();
        let mut layers = BTreeSet::new();
        for (id, record) in &index.images {
            blobs.insert(id.strip_prefix("sha256:").unwrap_or(id).to_string());
            blobs.insert(
                record
                    .config
                    .strip_prefix("sha256:")
                    .unwrap_or(&record.config)
                    .to_string(),
            );
            if let Some(module) = &record.wasm {
                blobs.insert(
                    module
                        .digest
                        .strip_prefix("sha256:")
                        .unwrap_or(&module.digest)
                        .to_string(),
                );
            }
            for layer in &record.layers {
                blobs.insert(
                    layer
                        .digest
                        .strip_prefix("sha256:")
                        .unwrap_or(&layer.digest)
                        .to_string(),
                );
                layers.insert(
                    layer
                        .diff_id
                        .strip_prefix("sha256:")
                        .unwrap_or(&layer.diff_id)
                        .to_string(),
                );
            }
        }
        let mut stats = GcStats::default();
        let blob_dir = self.root().join("blobs/sha256");
        for name in dir_names(&blob_dir)? {
            if !blobs.contains(&name) {
                let path = blob_dir.join(&name);
                fs::remove_file(&path).map_err(io_err!("removing", &path))?;
                stats.blobs += 1;
            }
        }
        let layer_dir = self.root().join("layers");
        for name in dir_names(&layer_dir)? {
            if !layers.contains(&name) {
                // Renamed away first, so a half-deleted layer is never seen under layers/.
                let path = layer_dir.join(&name);
                let doomed = self.temp_path("gc");
                fs::rename(&path, &doomed).map_err(io_err!("removing", &path))?;
                fs::remove_dir_all(&doomed).map_err(io_err!("removing", &doomed))?;
                stats.layers += 1;
            }
        }
        let tmp_dir = self.root().join("tmp");
        for name in dir_names(&tmp_dir)? {
            let path = tmp_dir.join(&name);
            let result = if path.is_dir() && !path.is_symlink() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            result.map_err(io_err!("removing", &path))?;
            stats.temp += 1;
        }
        Ok(stats)
    }
}

fn dir_names(dir: &Path) -> Result<Vec<String>, ImageError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err!("listing", dir))? {
        let entry = entry.map_err(io_err!("listing", dir))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

fn is_exists_error(errno: i32) -> bool {
    errno == rustix::io::Errno::NOTEMPTY.raw_os_error()
        || errno == rustix::io::Errno::EXIST.raw_os_error()
}

pub(crate) fn verify_digest(
    what: &'static str,
    expected: &Digest,
    actual_hex: &str,
) -> Result<(), ImageError> {
    if expected.hex() == actual_hex {
        Ok(())
    } else {
        Err(ImageError::DigestMismatch {
            what,
            expected: expected.to_string(),
            actual: format!("sha256:{actual_hex}"),
        })
    }
}

pub(crate) fn verify_size(
    digest: &Digest,
    expected: Option<u64>,
    actual: u64,
) -> Result<(), ImageError> {
    match expected {
        Some(expected) if expected != actual => Err(ImageError::SizeMismatch {
            digest: digest.to_string(),
            expected,
            actual,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    fn record(names: &[&str]) -> ImageRecord {
        ImageRecord {
            names: names.iter().map(|n| n.to_string()).collect(),
            config: format!("sha256:{}", "c".repeat(64)),
            created: None,
            layers: Vec::new(),
            image_config: ImageConfig::default(),
            wasm: None,
        }
    }

    #[test]
    fn find_by_id_name_and_prefix() {
        let mut index = IndexFile::default();
        let a = format!("sha256:abcd{}", "0".repeat(60));
        let b = format!("sha256:abce{}", "1".repeat(60));
        // An image named like a hex prefix: the name wins over the prefix.
        index.images.insert(a.clone(), record(&["abce:latest"]));
        index.images.insert(b.clone(), record(&["b:latest"]));
        let id = |q: &str| match ImageStore::find(&index, q).unwrap() {
            Match::Id(id) | Match::Name { id, .. } => id,
        };
        assert_eq!(id(&a), a);
        assert_eq!(id("abcd"), a);
        assert_eq!(id("sha256:abcd0"), a);
        assert_eq!(id("abce"), a);
        assert_eq!(id("abce1"), b);
        assert_eq!(id("b"), b);
        let err = ImageStore::find(&index, "abc").err().unwrap();
        assert_eq!(err.to_string(), "image \"abc:latest\" not found");
        index
            .images
            .insert(format!("sha256:abcf{}", "2".repeat(60)), record(&[]));
        let err = ImageStore::find(&index, "sha256:abc").err().unwrap();
        assert_eq!(
            err.to_string(),
            "image \"sha256:abc\" not found",
            "3 hex digits are not enough"
        );
        let err = ImageStore::find(&index, "sha256:abc0").err().unwrap();
        assert!(matches!(err, ImageError::NotFound(_)));
        // Neither a name nor an id: what is wrong with it, not "not found".
        let err = ImageStore::find(&index, "BUSYBOX::x").err().unwrap();
        assert!(
            err.to_string().starts_with(
                "invalid image name \"BUSYBOX::x\": repository component \"BUSYBOX:\""
            ),
            "{err}"
        );
        index
            .images
            .insert(format!("sha256:abcd{}", "3".repeat(60)), record(&[]));
        let err = ImageStore::find(&index, "abcd").err().unwrap();
        assert_eq!(
            err.to_string(),
            "image id prefix \"abcd\" is ambiguous: it matches 2 images"
        );
    }
}
