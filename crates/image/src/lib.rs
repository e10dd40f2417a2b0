//! The local image store: OCI images imported from a layout or pulled from a registry, their
//! layers unpacked once and shared by every image (and container) that uses them.
//!
//! # Layout on disk
//!
//! ```text
//! <dir>/
//!   index.json              names and images: {"images": {"sha256:<manifest>": {names, layers, config, ..}}}
//!   blobs/sha256/<hex>      manifests, configs, compressed layers and Wasm modules, content-addressed
//!   layers/<diff_id hex>/   one unpacked layer: an overlayfs lowerdir
//!   tmp/                    work in progress (downloads, unpacks, staged tars)
//!   index.lock, gc.lock     flock(2) files
//! ```
//!
//! An image's id is the digest of its manifest. Layers are keyed by their *diff_id* (the digest
//! of the uncompressed tar, from the config) rather than the compressed digest, so the same layer
//! compressed two ways is unpacked once.
//!
//! # Wasm modules
//!
//! Two shapes of image carry a WebAssembly module, and [`Image::wasm_module`] finds it in both:
//!
//! * a **Wasm OCI artifact** (the CNCF TAG-Runtime layout: config
//!   `application/vnd.wasm.config.v0+json`, one layer `application/wasm`, or
//!   `application/vnd.wasm.content.layer.v1+wasm` from the older `wasm-to-oci`). Its layer is
//!   not a tar: it is verified like any blob and kept as one, so `blobs/sha256/<hex>` holds
//!   exactly the module's bytes and [`Image::wasm`] points at it; the image has no unpacked
//!   layers. The config is read leniently (only `created` is used; `{}` is fine). A manifest
//!   mixing a Wasm layer with other layers is refused. [`ImageStore::import_wasm`] (and
//!   [`ImageStore::import`] given a `.wasm` or `.wat` file) wraps a bare module into such an
//!   artifact, deterministically: the same module always gets the same image id. In
//!   `index.json` such an image's record has `"layers": []` and a `"wasm": {digest, size}`
//!   entry, which garbage collection counts as a reference; records without it read as before
//!   (a build older than this one would not see that reference, so must not collect a store
//!   holding Wasm images);
//! * a **container image whose entrypoint is a `.wasm` file** (the runwasi convention:
//!   `FROM scratch`, `COPY app.wasm /`, `ENTRYPOINT ["/app.wasm"]`). It is stored like any
//!   image; the module is looked up in the unpacked layers when asked for, as overlayfs would
//!   show it, and refused if it is a symlink.
//!
//! # Integrity
//!
//! Every blob is hashed as it is written and must match the digest that names it (and the
//! descriptor's size); every layer's uncompressed stream must hash to its diff_id. Nothing is
//! trusted because of where it came from: a layout on local disk is checked like a registry.
//! Digests are validated (`sha256:` + 64 hex) before they are used as file names.
//!
//! # Safe unpacking
//!
//! Layer tars are untrusted, and the store runs as root. The `tar` crate is only used to *read*
//! entries; the `unpack` module's own code creates each entry relative to directory file descriptors,
//! opening every parent component with `O_NOFOLLOW`, so no entry can be written through a symlink,
//! and names that are absolute or contain `..` are rejected with an error naming the entry. See
//! the module for the details, and for the OCI-to-overlayfs whiteout conversion.
//!
//! # Concurrency
//!
//! The store is shared by threads and processes (the server and the CLI) without a daemon:
//!
//! * files appear atomically: a blob or a layer is written under `tmp/` and renamed into place,
//!   so a reader sees a whole blob or layer or none. Two importers unpacking the same layer both
//!   do the work, and the loser of the rename throws its copy away. What is renamed was flushed
//!   first (a blob's `fsync`, a layer's `syncfs`), so a crash cannot leave a named blob or
//!   layer whose data never reached the disk;
//! * `index.json` is rewritten (temp file + rename) under an exclusive lock on `index.lock`;
//! * importers hold a shared lock on `gc.lock` from their first write until their image is in the
//!   index, and garbage collection takes it exclusively, so it never deletes a blob that an
//!   import has written but not yet registered. [`ImageStore::remove`] collects only if no import
//!   is running (it never waits for a pull); what it skips is collected by a later removal or
//!   [`ImageStore::gc`].
//!
//! Removing an image deletes its layers once no image uses them. The store does not know which
//! containers have a layer mounted: callers must not remove an image that a running container
//! uses.

mod error;
mod import;
mod oci;
mod pull;
mod reference;
mod store;
pub mod testing;
mod unpack;
mod wasm;

use std::path::PathBuf;

use std::fs::File;

use serde::{Deserialize, Serialize};

pub use error::ImageError;
pub use reference::normalize_name;
pub use store::{GcStats, ImageStore};

/// Opens a file the store was pointed at (a layout's, an import's) for reading, refusing
/// anything but a regular file. The path is first opened with `O_PATH`, which opens nothing:
/// no FIFO open waits for a writer (holding the store's locks), no device open has side
/// effects (`/dev/watchdog` arms on open). Only once that handle is known to be a regular
/// file is it opened for reading, through `/proc/self/fd`, so the file checked is the file
/// read. `nofollow` refuses a symlink as the last component.
pub(crate) fn open_regular(path: &std::path::Path, nofollow: bool) -> std::io::Result<File> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut flags = rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC;
    if nofollow {
        flags |= rustix::fs::OFlags::NOFOLLOW;
    }
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)?;
    if !handle.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::CLOEXEC.bits() as i32)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
}

/// What tells a file's content changed without reading it: a write changes the size or the
/// modification time, and always the change time (which no caller can set back); a replaced
/// file (rename over it) has another inode. Times are to the nanosecond. Used for the parsed
/// `index.json` here and by the wasm backend's module cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileIdentity {
    /// The identity of the file at `path` now (symlinks followed).
    pub fn of(path: &std::path::Path) -> std::io::Result<Self> {
        Ok(Self::of_metadata(&std::fs::metadata(path)?))
    }

    /// The identity of the file `meta` describes (from an open handle, say).
    pub fn of_metadata(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// One image in the store, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    /// `sha256:<hex>` of the image manifest.
    pub id: String,
    /// Normalized names (`busybox:latest`), sorted. Empty for an image whose names all moved
    /// to newer images; it stays until removed by id.
    pub names: Vec<String>,
    /// Sum of the compressed layer sizes (a Wasm artifact: the module's size), in bytes.
    pub size: u64,
    /// Number of layers (1 for a Wasm artifact: its module).
    pub layers: usize,
    /// The config's `created` timestamp (RFC 3339), if it has one.
    pub created: Option<String>,
    /// What the image holds.
    #[serde(default)]
    pub kind: ImageKind,
}

/// What an image holds, as listed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    /// Filesystem layers. A runwasi-style image (a `.wasm` entrypoint in tar layers) is one
    /// too: telling it apart would mean looking into its layers.
    #[default]
    Container,
    /// A Wasm OCI artifact: one module blob, no layers.
    Wasm,
}

impl std::fmt::Display for ImageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageKind::Container => "container",
            ImageKind::Wasm => "wasm",
        })
    }
}

/// What a runtime needs to start a container from an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub id: String,
    pub names: Vec<String>,
    /// Unpacked layer directories, bottom to top. overlayfs wants `lowerdir=` top to bottom,
    /// so reverse them there. Empty for a Wasm artifact.
    pub layers: Vec<PathBuf>,
    /// Empty for a Wasm artifact (its config has no runtime part).
    pub config: ImageConfig,
    /// For a Wasm OCI artifact, the module: a file `blobs/sha256/<hex>` of the store holding
    /// exactly the module's bytes. `None` for any other image; see [`Image::wasm_module`],
    /// which also finds a module named by a container image's entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm: Option<PathBuf>,
}

/// The runtime part of an image config. Empty vectors and `None` mean "not set".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// Options for [`ImageStore::pull`].
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Talk plain HTTP to the registry (for a registry on localhost without TLS).
    pub insecure: bool,
}

/// Progress reported by [`ImageStore::pull`], in order: `Resolved`, then `Layer` events (byte
/// counts, per layer), `Unpacking` per layer that is not unpacked yet, and `Done`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullProgress {
    /// The manifest is known.
    Resolved {
        reference: String,
        layers: usize,
        total_bytes: u64,
    },
    /// `done` of `total` bytes of a layer are downloaded. A layer already in the store is
    /// reported once with `done == total`.
    Layer {
        digest: String,
        done: u64,
        total: u64,
    },
    /// A layer is being unpacked.
    Unpacking { digest: String },
    /// The image is in the store under this id.
    Done { id: String },
}
