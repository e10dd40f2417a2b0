//! The crate's one error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the image store. Each message names the image, path, digest or
/// entry concerned; an underlying cause is kept as the error's `source`, not repeated in the text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// No image has this name, id or id prefix.
    #[error("image \"{0}\" not found")]
    NotFound(String),

    /// An id prefix matched more than one image.
    #[error("image id prefix \"{prefix}\" is ambiguous: it matches {count} images")]
    AmbiguousId { prefix: String, count: usize },

    /// A name or reference does not follow the image reference grammar.
    #[error("invalid image name \"{name}\": {reason}")]
    InvalidName { name: String, reason: String },

    /// A digest is not `sha256:` followed by 64 lowercase hex digits.
    #[error("invalid digest \"{digest}\": {reason}")]
    InvalidDigest { digest: String, reason: String },

    /// Content does not hash to the digest that names it.
    #[error("{what} {expected} does not match its content (sha256 of the content is {actual})")]
    DigestMismatch {
        /// What was checked: "blob", "layer diff_id", "manifest".
        what: &'static str,
        expected: String,
        actual: String,
    },

    /// A blob's length differs from its descriptor's `size`.
    #[error("blob {digest}: descriptor says {expected} bytes but the content has {actual}")]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },

    /// An OCI image layout (directory or tar) is malformed.
    #[error("OCI layout {path}: {reason}")]
    InvalidLayout { path: PathBuf, reason: String },

    /// A manifest, index or config does not have the expected shape.
    #[error("{what}: {reason}")]
    InvalidManifest { what: String, reason: String },

    /// JSON that failed to parse.
    #[error("{what} is not valid JSON")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },

    /// A layer entry that would write outside the layer directory, or could not be placed safely.
    #[error("layer {layer} entry \"{entry}\" {reason}")]
    UnsafeEntry {
        layer: String,
        entry: String,
        reason: String,
    },

    /// An I/O failure while unpacking a layer entry.
    #[error("layer {layer}: unpacking entry \"{entry}\"")]
    Unpack {
        layer: String,
        entry: String,
        #[source]
        source: io::Error,
    },

    /// A media type or digest algorithm the store cannot handle.
    #[error("{0}")]
    Unsupported(String),

    /// An index entry that names no manifest for linux/amd64.
    #[error("\"{reference}\" has no linux/amd64 image (platforms offered: {offered})")]
    NoMatchingPlatform { reference: String, offered: String },

    /// A registry request failed.
    #[error("pulling \"{reference}\": {action}")]
    Registry {
        reference: String,
        action: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The store's own files are damaged (an image lists a layer that is gone, say).
    #[error("image store {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },

    /// Any other file system failure, with the path involved.
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A file given as a Wasm module is neither a Wasm binary nor WAT text that parses.
    #[error("{path} is not a Wasm module: {reason}")]
    InvalidModule {
        path: PathBuf,
        reason: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// An image's entrypoint names a `.wasm` file that cannot be used as its module: missing,
    /// deleted by a whiteout, a symlink, not a regular file, or a path with `..`.
    #[error("image {image}: {field} \"{path}\" {reason}")]
    WasmModule {
        /// The image's first name, or its id.
        image: String,
        /// `config.entrypoint[0]` or `config.cmd[0]`.
        field: &'static str,
        path: String,
        reason: String,
    },

    /// The image a removal was checked against changed before the removal (a pull or import
    /// moved its name meanwhile).
    #[error(
        "image {name} changed while it was being removed (a pull or import of the same name?): \
         retry"
    )]
    Changed { name: String },

    /// A blocking worker thread failed (panicked or was cancelled).
    #[error("image store worker thread failed: {0}")]
    Worker(String),
}

impl ImageError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        ImageError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn json(what: impl Into<String>, source: serde_json::Error) -> Self {
        ImageError::Json {
            what: what.into(),
            source,
        }
    }
}

/// `io_err!("reading", path)` builds a closure for `map_err`.
macro_rules! io_err {
    ($action:expr, $path:expr) => {
        |e| $crate::error::ImageError::io($action, $path, e)
    };
}
pub(crate) use io_err;
