//! WebAssembly modules in the store: bare modules wrapped into Wasm OCI artifacts, the check
//! that an artifact's layer is a Wasm binary, and finding an image's module
//! ([`Image::wasm_module`]), whether it is an artifact's blob or a `.wasm` entrypoint in tar
//! layers (the runwasi convention).

use std::borrow::Cow;
use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, fgetxattr, openat, statat};
use rustix::io::Errno;
use serde_json::json;

use crate::error::{ImageError, io_err};
use crate::oci::{self, Manifest};
use crate::reference::{Digest, Reference};
use crate::store::{ImageRecord, ImageStore, WasmRecord, sha256_hex};
use crate::unpack::DIR_FLAGS;
use crate::{Image, ImageSummary};

/// The version field of a component-model binary (`0x0d 0x00`, layer `0x01 0x00`), as opposed
/// to a core module's `1`.
const COMPONENT_VERSION: [u8; 4] = [0x0d, 0x00, 0x01, 0x00];

/// The blobs of a Wasm OCI artifact holding one module.
pub(crate) struct Artifact {
    /// The config: `{"architecture":"wasm","layerDigests":[..],"os":"wasip1"}` (`wasip2` for a
    /// component). No `created`, so the same module always makes the same bytes.
    pub config: Vec<u8>,
    /// The image manifest, whose digest is the image id.
    pub manifest: Vec<u8>,
}

impl Artifact {
    /// Builds the artifact of `module` (a Wasm binary, not checked here).
    pub fn new(module: &[u8]) -> Result<Artifact, serde_json::Error> {
        let module_digest = format!("sha256:{}", sha256_hex(module));
        let os = if module.get(4..8) == Some(&COMPONENT_VERSION[..]) {
            "wasip2"
        } else {
            "wasip1"
        };
        let config = serde_json::to_vec(&json!({
            "architecture": "wasm",
            "os": os,
            "layerDigests": [module_digest],
        }))?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": oci::OCI_MANIFEST,
            "artifactType": oci::WASM_CONFIG,
            "config": {
                "mediaType": oci::WASM_CONFIG,
                "digest": format!("sha256:{}", sha256_hex(&config)),
                "size": config.len(),
            },
            "layers": [{
                "mediaType": oci::WASM_LAYER,
                "digest": module_digest,
                "size": module.len(),
            }],
        }))?;
        Ok(Artifact { config, manifest })
    }
}

/// Whether `import` should take `path` for a bare module: a file starting with the Wasm magic,
/// or named `*.wasm` / `*.wat` (so that a broken one gets a module's error, not a layout's).
pub(crate) fn looks_like_module(path: &Path) -> Result<bool, ImageError> {
    if matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("wasm" | "wat")
    ) {
        return Ok(true);
    }
    let mut head = [0u8; 4];
    let mut file = crate::open_regular(path, false).map_err(io_err!("opening", path))?;
    let n = file.read(&mut head).map_err(io_err!("reading", path))?;
    Ok(n == head.len() && &head == oci::WASM_MAGIC)
}

/// The largest module file imported, as the wasm backend loads at most (real modules are
/// tens of MiB).
const MAX_MODULE_BYTES: u64 = 512 << 20;

/// Reads a module file: a Wasm binary as is, WAT text compiled to one
/// ([`ImageStore::wasm_binary`]).
fn read_module(path: &Path) -> Result<Vec<u8>, ImageError> {
    let mut bytes = Vec::new();
    crate::open_regular(path, false)
        .map_err(io_err!("opening", path))?
        .take(MAX_MODULE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err!("reading", path))?;
    if bytes.len() as u64 > MAX_MODULE_BYTES {
        return Err(ImageError::InvalidModule {
            path: path.to_path_buf(),
            reason: format!(
                "it is larger than the {} MiB a module may have",
                MAX_MODULE_BYTES >> 20
            ),
            source: None,
        });
    }
    Ok(ImageStore::wasm_binary(path, &bytes)?.into_owned())
}

/// Why a file is not WAT text, as far as it may be shown: where, and what kind of error,
/// without the text of the file (see [`ImageStore::wasm_binary`]).
#[derive(Debug)]
struct WatError {
    /// Line and column, from 1.
    at: Option<(u32, u32)>,
    reason: String,
}

impl WatError {
    /// Takes wat's message apart; the crate gives no other access to the position. Its forms:
    /// `REASON\n --> <anon>:LINE:COL\n | SOURCE LINE...`, or `REASON at <anon>:LINE:COL` (a
    /// column past 500); anything else is taken for a bare reason.
    fn new(e: &wat::Error) -> WatError {
        let text = e.to_string();
        let mut lines = text.lines();
        let mut reason = lines.next().unwrap_or_default();
        let mut at = lines
            .next()
            .and_then(|l| l.trim().strip_prefix("--> <anon>:"))
            .and_then(line_column);
        if at.is_none()
            && let Some((before, pos)) = reason.rsplit_once(" at <anon>:")
        {
            at = line_column(pos);
            reason = before;
        }
        WatError {
            at,
            reason: without_file_text(reason),
        }
    }
}

/// `LINE:COL` as numbers.
fn line_column(pos: &str) -> Option<(u32, u32)> {
    let (line, column) = pos.split_once(':')?;
    Some((line.parse().ok()?, column.parse().ok()?))
}

/// The start of a wat reason that cannot hold text of the file: up to the first quote,
/// backtick, number or other sign, which is where wat puts an identifier (failed to find
/// name `` `$x` ``), a character or a number of the file. Kept: digits inside a word (`i32`),
/// apostrophes inside one (`aren't`), and the grammar's `` `(` `` and `` `)` ``.
fn without_file_text(reason: &str) -> String {
    let mut kept = String::new();
    let mut rest = reason;
    while let Some(c) = rest.chars().next() {
        let after_letter = kept.ends_with(|p: char| p.is_ascii_alphanumeric());
        let ok = c.is_ascii_alphabetic()
            || matches!(c, ' ' | ',' | ':' | '-')
            || (c.is_ascii_digit() && after_letter)
            || (c == '\''
                && after_letter
                && rest[1..].starts_with(|n: char| n.is_ascii_alphabetic()));
        if ok {
            kept.push(c);
            rest = &rest[c.len_utf8()..];
        } else if let Some(token) = ["`(`", "`)`"].into_iter().find(|t| rest.starts_with(t)) {
            kept.push_str(token);
            rest = &rest[token.len()..];
        } else {
            break;
        }
    }
    let kept = kept.trim_end_matches([' ', ',', ':', '-']);
    if kept.is_empty() {
        "syntax error".to_string()
    } else {
        kept.to_string()
    }
}

impl std::fmt::Display for WatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.at {
            Some((line, column)) => write!(f, "line {line}, column {column}: {}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

impl std::error::Error for WatError {}

impl ImageStore {
    /// The Wasm binary in a module file's `bytes` (read from `path`): the bytes as they are if
    /// they start with the Wasm magic, compiled if they are WAT text (after blanks and
    /// comments, a `(`). The wasm backend shares it for the module files it runs, which is
    /// why it is here, on an exported type.
    ///
    /// The error ([`ImageError::InvalidModule`]) never quotes the file: the server reads any
    /// path a client names, and wat's own message shows the offending line and identifiers.
    /// Its reason says which of the two the file fails to be (`no \0asm header, and not
    /// WAT text`, `invalid WAT text`); its source why: for WAT text, wat's position and kind
    /// of error (`line 3, column 7: unknown func: failed to find name`). A module that parses
    /// is not validated here: the engine that runs it does that.
    pub fn wasm_binary<'a>(path: &Path, bytes: &'a [u8]) -> Result<Cow<'a, [u8]>, ImageError> {
        let invalid = |reason: String, source: Option<WatError>| ImageError::InvalidModule {
            path: path.to_path_buf(),
            reason,
            source: source.map(|e| Box::new(e) as _),
        };
        if bytes.starts_with(oci::WASM_MAGIC) {
            if bytes.len() < 8 {
                return Err(invalid(
                    format!(
                        "{} bytes long, shorter than the 8-byte Wasm header (magic and version)",
                        bytes.len()
                    ),
                    None,
                ));
            }
            return Ok(Cow::Borrowed(bytes));
        }
        if wat::Detect::from_bytes(bytes) != wat::Detect::WasmText {
            // Not parsed: wat takes an empty file for an empty module, and any other text
            // fails at its first token.
            let why = if std::str::from_utf8(bytes).is_err() {
                "it is not UTF-8"
            } else {
                "it does not start with `(` after blanks and comments"
            };
            return Err(invalid(
                "no \\0asm header, and not WAT text".to_string(),
                Some(WatError {
                    at: None,
                    reason: why.to_string(),
                }),
            ));
        }
        wat::parse_bytes(bytes)
            .map_err(|e| invalid("invalid WAT text".to_string(), Some(WatError::new(&e))))
    }

    /// Imports the WebAssembly module in the file `module` under `name` (normalized:
    /// `hello` is `hello:latest`), as a Wasm OCI artifact: the module is the one layer
    /// (`application/wasm`), with a `application/vnd.wasm.config.v0+json` config. The file is
    /// a Wasm binary (it starts with `\0asm` and a version) or WAT text, which is compiled
    /// and stored as the binary. Blobs are content-addressed and the artifact carries no
    /// time, so importing the same module again, under any name, makes the same image.
    pub fn import_wasm(&self, module: &Path, name: &str) -> Result<ImageSummary, ImageError> {
        let name = Reference::parse(name)?.familiar();
        let bytes = read_module(module)?;
        let artifact = Artifact::new(&bytes).map_err(|e| ImageError::json("Wasm artifact", e))?;
        let id = Digest::from_hex(&sha256_hex(&artifact.manifest))?;
        let what = format!("manifest {id}");
        let manifest: Manifest =
            serde_json::from_slice(&artifact.manifest).map_err(|e| ImageError::json(&what, e))?;
        let record = ImageRecord::new(&manifest, &artifact.config, &what)?;
        let _gc = self.lock_gc_shared()?;
        self.put_blob_bytes(&manifest.config.digest()?, &artifact.config)?;
        self.put_blob_bytes(&Digest::from_hex(&sha256_hex(&bytes))?, &bytes)?;
        self.put_blob_bytes(&id, &artifact.manifest)?;
        let summary = self.register(&id, record, &[name])?;
        tracing::info!(id = %summary.id, names = ?summary.names, module = %module.display(), "imported Wasm module");
        Ok(summary)
    }

    /// Checks that a stored Wasm layer is a Wasm binary, so that a mislabelled blob (a tar, a
    /// gzip) is refused at import rather than failing obscurely when run.
    pub(crate) fn check_wasm_blob(&self, module: &WasmRecord) -> Result<(), ImageError> {
        let path = self.blob_path(&Digest::parse(&module.digest)?);
        let mut head = Vec::with_capacity(8);
        File::open(&path)
            .map_err(io_err!("opening", &path))?
            .take(8)
            .read_to_end(&mut head)
            .map_err(io_err!("reading", &path))?;
        if head.len() < 8 || !head.starts_with(oci::WASM_MAGIC) {
            return Err(ImageError::InvalidManifest {
                what: format!("layer {}", module.digest),
                reason:
                    "it has a Wasm media type but is not a Wasm binary (it does not start with \
                         \"\\0asm\" and a version)"
                        .to_string(),
            });
        }
        Ok(())
    }
}

/// What one layer says about a path.
enum InLayer {
    /// A regular file: the answer.
    File,
    /// Nothing there; the layer below decides, unless a directory on the way is opaque.
    Absent { opaque: bool },
    /// Deleted here (whiteout) or shadowed by a non-directory on the way: lower layers do not
    /// count.
    Hidden(String),
}

impl Image {
    /// The WebAssembly module this image runs, if it is a Wasm image:
    ///
    /// * for a Wasm OCI artifact, [`Image::wasm`]: the blob in `blobs/sha256/` holding exactly
    ///   the module;
    /// * for a container image whose first argument (`config.entrypoint[0]`, or `config.cmd[0]`
    ///   when there is no entrypoint) ends in `.wasm`, that file as the container would see it:
    ///   a path `<layer dir>/<file>` inside the topmost layer that has it. A relative name is
    ///   taken from `working_dir` (or `/`). Layers are searched top first, as overlayfs would:
    ///   a whiteout or an opaque directory stops the search. Every component is checked without
    ///   following symlinks, so the path is a regular file inside the layer directory;
    /// * `None` for any other image.
    ///
    /// An entrypoint `.wasm` that is missing, deleted, a symlink (anywhere on its path), not a
    /// regular file, or whose name has a `..` component is an error naming the field
    /// ([`ImageError::WasmModule`]). Layers are immutable once in the store, so the path stays
    /// valid as long as the image is not removed.
    pub fn wasm_module(&self) -> Result<Option<PathBuf>, ImageError> {
        if let Some(module) = &self.wasm {
            return Ok(Some(module.clone()));
        }
        let (field, arg) = match (self.config.entrypoint.first(), self.config.cmd.first()) {
            (Some(entrypoint), _) => ("config.entrypoint[0]", entrypoint),
            (None, Some(cmd)) => ("config.cmd[0]", cmd),
            (None, None) => return Ok(None),
        };
        if !arg.ends_with(".wasm") {
            return Ok(None);
        }
        let fail = |reason: String| ImageError::WasmModule {
            image: self.names.first().unwrap_or(&self.id).clone(),
            field,
            path: arg.clone(),
            reason,
        };
        let full = if arg.starts_with('/') {
            arg.clone()
        } else {
            let dir = self.config.working_dir.as_deref().unwrap_or("/");
            format!("{}/{arg}", dir.trim_end_matches('/'))
        };
        let mut components = Vec::new();
        for component in full.split('/') {
            match component {
                "" | "." => {}
                ".." => return Err(fail("has a \"..\" component".to_string())),
                other => components.push(other),
            }
        }
        for layer in self.layers.iter().rev() {
            match look_in_layer(layer, &components).map_err(fail)? {
                InLayer::File => {
                    return Ok(Some(
                        components.iter().fold(layer.clone(), |p, c| p.join(c)),
                    ));
                }
                InLayer::Absent { opaque: false } => {}
                InLayer::Absent { opaque: true } => break,
                InLayer::Hidden(reason) => return Err(fail(reason)),
            }
        }
        Err(fail("is not in the image's layers".to_string()))
    }
}

/// Looks `components` (a file path from the root) up in one unpacked layer, never following a
/// symlink. Errors are reasons, to be wrapped with the image and field.
fn look_in_layer(layer: &Path, components: &[&str]) -> Result<InLayer, String> {
    let io = |at: &str, e: Errno| {
        format!(
            "cannot be looked up in layer {}: {at}: {e}",
            layer.display()
        )
    };
    let Some((last, parents)) = components.split_last() else {
        return Err("names no file".to_string());
    };
    let mut dir = openat(rustix::fs::CWD, layer, DIR_FLAGS, Mode::empty())
        .map_err(|e| io(&layer.display().to_string(), e))?;
    let mut opaque = is_opaque(&dir).map_err(|e| io("/", e))?;
    let mut shown = String::new();
    for parent in parents {
        shown.push('/');
        shown.push_str(parent);
        match kind(&dir, parent).map_err(|e| io(&shown, e))? {
            Kind::Missing => return Ok(InLayer::Absent { opaque }),
            Kind::Dir => {
                dir = openat(&dir, *parent, DIR_FLAGS, Mode::empty()).map_err(|e| io(&shown, e))?;
                opaque |= is_opaque(&dir).map_err(|e| io(&shown, e))?;
            }
            Kind::Symlink => {
                return Err(format!(
                    "is reached through a symlink ({shown}): a Wasm module must be a regular file, not behind a link"
                ));
            }
            Kind::Whiteout => {
                return Ok(InLayer::Hidden(format!(
                    "is deleted: {shown} is whited out"
                )));
            }
            Kind::File | Kind::Other => {
                return Ok(InLayer::Hidden(format!(
                    "is not in the image: {shown} is not a directory"
                )));
            }
        }
    }
    shown.push('/');
    shown.push_str(last);
    match kind(&dir, last).map_err(|e| io(&shown, e))? {
        Kind::File => Ok(InLayer::File),
        Kind::Missing => Ok(InLayer::Absent { opaque }),
        Kind::Whiteout => Ok(InLayer::Hidden("is deleted by a whiteout".to_string())),
        Kind::Symlink => Err("is a symlink: a Wasm module must be a regular file".to_string()),
        Kind::Dir => Err("is a directory, not a regular file".to_string()),
        Kind::Other => Err("is not a regular file".to_string()),
    }
}

enum Kind {
    Missing,
    File,
    Dir,
    Symlink,
    /// overlayfs's whiteout: a 0:0 character device (what `unpack` makes of `.wh.NAME`).
    Whiteout,
    Other,
}

fn kind(dir: &OwnedFd, name: &str) -> Result<Kind, Errno> {
    let stat = match statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(Errno::NOENT) => return Ok(Kind::Missing),
        Err(e) => return Err(e),
    };
    Ok(match FileType::from_raw_mode(stat.st_mode) {
        FileType::RegularFile => Kind::File,
        FileType::Directory => Kind::Dir,
        FileType::Symlink => Kind::Symlink,
        FileType::CharacterDevice if stat.st_rdev == 0 => Kind::Whiteout,
        _ => Kind::Other,
    })
}

/// Whether a directory hides the lower layers' content (`.wh..wh..opq` in the tar).
fn is_opaque(dir: &OwnedFd) -> Result<bool, Errno> {
    let mut value = [0u8; 4];
    match fgetxattr(dir, "trusted.overlay.opaque", &mut value[..]) {
        Ok(n) => Ok(value.get(..n) == Some(&b"y"[..])),
        // No attribute, a file system without xattrs (where unpack could not have set one), or
        // a value longer than "y".
        Err(Errno::NODATA | Errno::NOTSUP | Errno::RANGE) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error of `bytes` as a module, with its source, as the CLI prints it.
    fn refusal(bytes: &[u8]) -> String {
        let Err(e) = ImageStore::wasm_binary(Path::new("m.wat"), bytes) else {
            panic!(
                "{:?} was taken for a module",
                String::from_utf8_lossy(bytes)
            );
        };
        match std::error::Error::source(&e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        }
    }

    #[test]
    fn errors_give_the_position_and_kind_but_never_the_text() {
        let long_line = format!("(module {} (func (call $secret)))", " ".repeat(600));
        let cases: [(&[u8], &str); 8] = [
            (
                b"TOP-SECRET password=x",
                "m.wat is not a Wasm module: no \\0asm header, and not WAT text: it does not \
                 start with `(` after blanks and comments",
            ),
            (
                b"(module (func (call $secret_token_xyz)))",
                "m.wat is not a Wasm module: invalid WAT text: line 1, column 21: unknown func: \
                 failed to find name",
            ),
            (
                b"(module\n  (func (i32.const 99999999999999999)))",
                "invalid WAT text: line 2, column 20: invalid i32 number: constant out of range",
            ),
            (
                b"(module (memory 1 (pagesize 3)))",
                "line 1, column 29: invalid custom page size",
            ),
            (b"(module (func \"secret))", "unexpected end-of-file"),
            (
                b"(module (func)) secret",
                "extra tokens remaining after parse",
            ),
            ("(module \u{202e}secret)".as_bytes(), "unexpected character"),
            (
                long_line.as_bytes(),
                "line 1, column 622: unknown func: failed to find name",
            ),
        ];
        for (bytes, want) in cases {
            let err = refusal(bytes);
            assert!(err.ends_with(want), "{err}");
            for secret in [
                "secret", "SECRET", "password", "9999", "\u{202e}", "-->", "|",
            ] {
                assert!(!err.contains(secret), "{err}");
            }
        }
        assert_eq!(
            refusal(b"(module"),
            "m.wat is not a Wasm module: invalid WAT text: line 1, column 8: expected `)`"
        );
    }

    #[test]
    fn wat_is_found_after_blanks_and_comments() {
        for text in [
            ";; c\n(module)",
            "(; block (; nested ;) ;)\n\t (module)",
            "  (module)",
        ] {
            let binary = ImageStore::wasm_binary(Path::new("m.wat"), text.as_bytes())
                .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(&binary[..], b"\0asm\x01\0\0\0", "{text}");
        }
        let err = refusal(b";; c\n(module (func $f) (func $f))");
        assert!(
            err.ends_with("invalid WAT text: line 2, column 25: duplicate func identifier"),
            "{err}"
        );
        // An empty module to wat, but not something meant as one.
        for text in ["", ";; only a comment", "(; unterminated (module)"] {
            assert!(refusal(text.as_bytes()).contains("not WAT text"), "{text}");
        }
        assert!(refusal(b"\xff(module)").ends_with("not WAT text: it is not UTF-8"));
        assert!(refusal(b"\0asm").contains("4 bytes long, shorter than the 8-byte Wasm header"));
    }

    #[test]
    fn the_kept_reason_stops_where_file_text_could_start() {
        for (reason, kept) in [
            (
                "unknown func: failed to find name `$x`",
                "unknown func: failed to find name",
            ),
            ("expected `(`", "expected `(`"),
            (
                "unexpected token, expected `i32`",
                "unexpected token, expected",
            ),
            (
                "invalid i32 number: constant out of range",
                "invalid i32 number: constant out of range",
            ),
            ("invalid custom page size: 3", "invalid custom page size"),
            (
                "invalid unicode scalar value 0x110000",
                "invalid unicode scalar value",
            ),
            ("unexpected character '\\u{202e}'", "unexpected character"),
            (
                "input bytes aren't valid utf-8",
                "input bytes aren't valid utf",
            ),
            ("`$x`", "syntax error"),
        ] {
            assert_eq!(without_file_text(reason), kept, "{reason}");
        }
    }
}
