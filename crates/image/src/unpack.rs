//! Unpacking one layer tar into a directory, safely.
//!
//! The tar is untrusted: its entry names, link targets and ordering are chosen by whoever built
//! the image. Everything here is done relative to directory file descriptors:
//!
//! * entry names are split into components; an absolute name or a `..` component is rejected
//!   before anything is touched;
//! * each parent component is opened with `openat(O_DIRECTORY | O_NOFOLLOW)` starting from the
//!   layer root, so a symlink in a parent position (`etc -> /` followed by `etc/passwd`) fails
//!   with an error instead of being followed; missing parents are created with `mkdirat`;
//! * the final component is created with `O_CREAT | O_EXCL | O_NOFOLLOW`, `symlinkat`, `linkat`
//!   (without `AT_SYMLINK_FOLLOW`) or `mknodat`, never by a path-based call that resolves links;
//! * hard-link targets go through the same component checks, so they stay inside the layer;
//! * symlink *targets* are stored verbatim: they are resolved inside the container later.
//!
//! Only this process writes into the (private, freshly made) destination directory, so checking
//! each component as it is opened leaves no window another writer could use.
//!
//! OCI whiteouts become overlayfs ones as they are met: `.wh.NAME` turns into a 0:0 character
//! device `NAME`, and `.wh..wh..opq` sets `trusted.overlay.opaque=y` on its directory. Device
//! nodes in the tar are skipped (a container gets its /dev from the runtime).
//!
//! Directory modes, owners and times are applied after the last entry, so that a directory
//! shipped read-only can still be filled.
//!
//! Sizes are bounded too, because a layer of a few KB can claim gigabytes:
//!
//! * the tar crate reads a GNU long name or link, or a PAX record, whole into memory before it
//!   yields the entry they describe, so the bytes read between two entries are capped at
//!   [`MAX_HEADER_BYTES`]; entry names and link targets longer than [`MAX_NAME_BYTES`] (the
//!   kernel's `PATH_MAX`) are refused;
//! * a layer may unpack to at most [`MAX_LAYER_BYTES`], counted both on the uncompressed stream
//!   and on the files written (a GNU sparse entry expands holes the stream does not carry);
//! * runs of zeros are written as holes, so a sparse file stays sparse on disk.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::rc::Rc;

use rustix::fs::{
    AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid, XattrFlags, fchmod, fchown,
    fsetxattr, linkat, makedev, mkdirat, mknodat, openat, statat, symlinkat, unlinkat, utimensat,
};
use rustix::io::Errno;
use sha2::{Digest as _, Sha256};

use crate::error::ImageError;
use crate::reference::Digest;

/// Most bytes of tar headers, GNU long names and links and PAX records read between two
/// entries. The tar crate holds them in memory, so without a cap a tiny compressed layer can
/// claim a name of gigabytes. Real headers are a few KiB at most (PAX xattrs included).
pub(crate) const MAX_HEADER_BYTES: u64 = 1 << 20;

/// The longest entry name or link target (the kernel's `PATH_MAX`): nothing longer can be
/// created or resolved in a rootfs.
pub(crate) const MAX_NAME_BYTES: usize = 4096;

/// Most bytes a layer may unpack to, on the uncompressed stream and in the files it writes:
/// the biggest real layers (CUDA, model weights) are tens of GiB; a decompression bomb or a
/// sparse entry with a hole of exabytes is stopped here instead of filling the disk.
pub(crate) const MAX_LAYER_BYTES: u64 = 64 << 30;

/// Shown instead of names longer than this in errors (a name may be 4 KiB of anything).
const SHOWN_NAME_BYTES: usize = 256;

pub(crate) const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Unpacks the layer blob at `blob` (tar, tar+gzip or tar+zstd) into the existing empty
/// directory `dest`, returning the sha256 of the uncompressed tar (the layer's diff_id).
/// `layer` names the layer in errors. On error `dest` may hold a partial tree: the caller
/// removes it.
pub(crate) fn unpack_layer(blob: &Path, dest: &Path, layer: &str) -> Result<Digest, ImageError> {
    unpack_within(blob, dest, layer, MAX_LAYER_BYTES)
}

/// [`unpack_layer`] with `max_bytes` for [`MAX_LAYER_BYTES`].
fn unpack_within(
    blob: &Path,
    dest: &Path,
    layer: &str,
    max_bytes: u64,
) -> Result<Digest, ImageError> {
    let file = File::open(blob).map_err(|e| ImageError::io("opening layer blob", blob, e))?;
    let reader = decompress(file).map_err(|e| ImageError::Unpack {
        layer: layer.to_string(),
        entry: "<compression header>".to_string(),
        source: e,
    })?;
    let header_budget = Rc::new(Cell::new(MAX_HEADER_BYTES));
    let mut archive =
        tar::Archive::new(HashingReader::new(reader, max_bytes, header_budget.clone()));
    let root = openat(rustix::fs::CWD, dest, DIR_FLAGS, Mode::empty())
        .map_err(|e| ImageError::io("opening layer directory", dest, e.into()))?;
    let mut extractor = Extractor {
        root,
        root_path: dest,
        layer,
        cache: None,
        dir_removed: false,
        dirs: Vec::new(),
        root_meta: None,
        written: 0,
        max_bytes,
        buffer: Vec::new(),
    };
    let entries = archive
        .entries()
        .map_err(|e| extractor.io("<archive>", e))?;
    let mut previous = String::from("<start of archive>");
    for entry in entries {
        let mut entry =
            entry.map_err(|e| extractor.io(&format!("<header after {previous}>"), e))?;
        // The entry's own data is bounded by MAX_LAYER_BYTES, not by the header budget; it is
        // read to its end here so the next header read starts from a full budget.
        header_budget.set(UNBOUNDED);
        previous = extractor.entry(&mut entry)?;
        io::copy(&mut entry, &mut io::sink()).map_err(|e| extractor.io(&previous, e))?;
        header_budget.set(MAX_HEADER_BYTES);
    }
    header_budget.set(UNBOUNDED);
    extractor.finish()?;
    // The tar may end with padding the entry iterator does not read; it is part of the diff_id.
    let mut hashing = archive.into_inner();
    io::copy(&mut hashing, &mut io::sink()).map_err(|e| ImageError::Unpack {
        layer: layer.to_string(),
        entry: "<end of archive>".to_string(),
        source: e,
    })?;
    Digest::from_hex(&hashing.hex())
}

/// Picks the decompressor from the first bytes rather than the media type: registries and tools
/// are not consistent about `+gzip` media types, magic numbers are.
pub(crate) fn decompress<R: Read + 'static>(reader: R) -> io::Result<Box<dyn Read>> {
    let mut buffered = BufReader::with_capacity(128 * 1024, reader);
    let head = buffered.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(buffered)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let decoder = ruzstd::decoding::StreamingDecoder::new(buffered)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        Ok(Box::new(decoder))
    } else {
        Ok(Box::new(buffered))
    }
}

/// Splits a tar entry name into its components, refusing names that could leave the root.
/// `.` and empty components are dropped, so `./bin//sh` is `["bin", "sh"]` and `./` is `[]`.
pub(crate) fn split_path(raw: &[u8]) -> Result<Vec<Vec<u8>>, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("is an absolute path (it would escape the rootfs)");
    }
    if raw.contains(&0) {
        return Err("contains a NUL byte");
    }
    let mut out = Vec::new();
    for component in raw.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err("escapes the rootfs (it has a \"..\" component)"),
            other => out.push(other.to_vec()),
        }
    }
    Ok(out)
}

/// A header budget that is not counted down (while an entry's data is read).
const UNBOUNDED: u64 = u64::MAX;

/// The layer's uncompressed stream: hashed for the diff_id, capped at `max_bytes` in all and
/// at the shared header budget (see [`MAX_HEADER_BYTES`]) between entries.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    total: u64,
    max_bytes: u64,
    header_budget: Rc<Cell<u64>>,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R, max_bytes: u64, header_budget: Rc<Cell<u64>>) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            total: 0,
            max_bytes,
            header_budget,
        }
    }

    fn hex(self) -> String {
        format!("{:x}", self.hasher.finalize())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.total += n as u64;
        if self.total > self.max_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the layer is larger than the {} a layer may unpack to",
                    size_shown(self.max_bytes)
                ),
            ));
        }
        let budget = self.header_budget.get();
        if budget != UNBOUNDED {
            let Some(left) = budget.checked_sub(n as u64) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "more than {} KiB of tar headers before one entry (a long name, link \
                         or PAX record that large is refused)",
                        MAX_HEADER_BYTES >> 10
                    ),
                ));
            };
            self.header_budget.set(left);
        }
        Ok(n)
    }
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
}

struct DeferredDir {
    components: Vec<Vec<u8>>,
    meta: Meta,
}

struct Extractor<'a> {
    root: OwnedFd,
    root_path: &'a Path,
    layer: &'a str,
    /// The last parent directory opened, by components: entries come grouped by directory.
    cache: Option<(Vec<Vec<u8>>, OwnedFd)>,
    /// Set when a directory was removed, which may have detached the cached parent.
    dir_removed: bool,
    dirs: Vec<DeferredDir>,
    root_meta: Option<Meta>,
    /// Bytes of regular files written so far, holes included.
    written: u64,
    /// The most `written` may reach ([`MAX_LAYER_BYTES`]).
    max_bytes: u64,
    /// The copy buffer for regular files, allocated on first use.
    buffer: Vec<u8>,
}

fn display(components: &[Vec<u8>]) -> String {
    let joined: Vec<u8> = components.join(&b'/');
    shown(&joined)
}

/// `bytes` in the largest binary unit that divides it (`64 GiB`, `1 MiB`).
fn size_shown(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b => format!("{b} bytes"),
    }
}

/// A name as errors show it: lossy UTF-8, cut short after [`SHOWN_NAME_BYTES`].
fn shown(raw: &[u8]) -> String {
    if raw.len() <= SHOWN_NAME_BYTES {
        return String::from_utf8_lossy(raw).into_owned();
    }
    format!(
        "{}... ({} bytes)",
        String::from_utf8_lossy(&raw[..SHOWN_NAME_BYTES]),
        raw.len()
    )
}

impl Extractor<'_> {
    fn io(&self, entry: &str, source: io::Error) -> ImageError {
        ImageError::Unpack {
            layer: self.layer.to_string(),
            entry: entry.to_string(),
            source,
        }
    }

    fn unsafe_entry(&self, entry: &str, reason: impl Into<String>) -> ImageError {
        ImageError::UnsafeEntry {
            layer: self.layer.to_string(),
            entry: entry.to_string(),
            reason: reason.into(),
        }
    }

    /// Creates what one entry describes; returns its name as errors show it.
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<String, ImageError> {
        let raw = entry.path_bytes();
        let name = shown(&raw);
        if raw.len() > MAX_NAME_BYTES {
            return Err(self.unsafe_entry(
                &name,
                format!("has a name longer than the {MAX_NAME_BYTES} bytes a path may have"),
            ));
        }
        let components = split_path(&raw).map_err(|reason| self.unsafe_entry(&name, reason))?;
        let header = entry.header();
        let kind = header.entry_type();
        // Records the tar crate hands over as entries (a PAX global header, or a long-name
        // or PAX record in an old-style header) describe nothing to create. Asking for their
        // PAX extensions would read their data whole into memory; the caller drains it.
        if kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink()
        {
            tracing::debug!(layer = self.layer, entry = %name, kind = ?kind, "skipping record");
            return Ok(name);
        }
        let mut meta = Meta {
            mode: header.mode().map_err(|e| self.io(&name, e))? & 0o7777,
            uid: header
                .uid()
                .map_err(|e| self.io(&name, e))?
                .try_into()
                .unwrap_or(0),
            gid: header
                .gid()
                .map_err(|e| self.io(&name, e))?
                .try_into()
                .unwrap_or(0),
            mtime: header.mtime().unwrap_or(0),
        };
        let link = entry.link_name_bytes().map(|l| l.into_owned());
        if link.as_ref().is_some_and(|l| l.len() > MAX_NAME_BYTES) {
            return Err(self.unsafe_entry(
                &name,
                format!("links to a name longer than the {MAX_NAME_BYTES} bytes a path may have"),
            ));
        }
        let mut xattrs = Vec::new();
        if let Some(extensions) = entry.pax_extensions().map_err(|e| self.io(&name, e))? {
            for extension in extensions {
                let extension = extension.map_err(|e| self.io(&name, e))?;
                let Ok(key) = extension.key() else { continue };
                let value = extension.value_bytes();
                match key {
                    "uid" => meta.uid = parse_decimal(value).unwrap_or(meta.uid),
                    "gid" => meta.gid = parse_decimal(value).unwrap_or(meta.gid),
                    _ => {
                        if let Some(attr) = key.strip_prefix("SCHILY.xattr.") {
                            xattrs.push((attr.to_string(), value.to_vec()));
                        }
                    }
                }
            }
        }

        let Some((file_name, parents)) = components.split_last() else {
            // The layer root itself ("./"): only its metadata matters.
            if kind.is_dir() {
                self.root_meta = Some(meta);
            }
            return Ok(name);
        };
        if let Some(target) = file_name.strip_prefix(b".wh.") {
            return self.whiteout(parents, target, &name).map(|()| name);
        }

        let supported = matches!(
            kind,
            tar::EntryType::Directory
                | tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::GNUSparse
                | tar::EntryType::Symlink
                | tar::EntryType::Link
                | tar::EntryType::Fifo
        );
        if !supported {
            // Device nodes (a container's /dev comes from the runtime), pax global headers and
            // unknown types: nothing to create, not even their parent directories.
            tracing::debug!(layer = self.layer, entry = %name, kind = ?kind, "skipping entry");
            return Ok(name);
        }

        let parent = self.open_parent(parents, &name)?;
        let result = match kind {
            tar::EntryType::Directory => self.directory(&parent, &components, meta, &xattrs),
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.regular(&parent, &components, meta, &xattrs, entry)
            }
            tar::EntryType::Symlink => {
                let target = link.unwrap_or_default();
                self.symlink(&parent, &components, meta, &target)
            }
            tar::EntryType::Link => {
                let target = link.unwrap_or_default();
                self.hardlink(&parent, &components, &target)
            }
            tar::EntryType::Fifo => self.fifo(&parent, &components, meta),
            _ => Ok(()), // filtered out above
        };
        if !std::mem::take(&mut self.dir_removed) {
            self.cache = Some((parents.to_vec(), parent));
        }
        result.map(|()| name)
    }

    /// Opens the directory `components` below the root, creating missing ones, without
    /// following any symlink.
    fn open_parent(&mut self, components: &[Vec<u8>], entry: &str) -> Result<OwnedFd, ImageError> {
        if let Some((cached, fd)) = self.cache.take()
            && cached == components
        {
            return Ok(fd);
        }
        self.walk(components, entry, true)
    }

    fn walk(
        &self,
        components: &[Vec<u8>],
        entry: &str,
        create: bool,
    ) -> Result<OwnedFd, ImageError> {
        let mut current = openat(&self.root, ".", DIR_FLAGS, Mode::empty())
            .map_err(|e| self.io(entry, e.into()))?;
        for (i, component) in components.iter().enumerate() {
            let opened = match openat(&current, component.as_slice(), DIR_FLAGS, Mode::empty()) {
                Err(Errno::NOENT) if create => {
                    match mkdirat(&current, component.as_slice(), Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(self.io(entry, e.into())),
                    }
                    openat(&current, component.as_slice(), DIR_FLAGS, Mode::empty())
                }
                other => other,
            };
            current = match opened {
                Ok(fd) => fd,
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    let prefix = display(&components[..=i]);
                    let is_link = statat(&current, component.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
                        .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
                        .unwrap_or(false);
                    return Err(if is_link {
                        self.unsafe_entry(
                            entry,
                            format!(
                                "has a symlink \"{prefix}\" as a parent directory \
                                 (refusing to follow it, it could point outside the rootfs)"
                            ),
                        )
                    } else {
                        self.unsafe_entry(
                            entry,
                            format!("has parent \"{prefix}\" that is not a directory"),
                        )
                    });
                }
                Err(Errno::NOENT) => {
                    let prefix = display(&components[..=i]);
                    return Err(self.io(
                        entry,
                        io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("\"{prefix}\" does not exist in the layer"),
                        ),
                    ));
                }
                Err(e) => return Err(self.io(entry, e.into())),
            };
        }
        Ok(current)
    }

    /// Makes room for a new entry named `name` in `parent`: removes what is there unless both
    /// are directories. Returns whether an existing directory was kept.
    fn clear(
        &mut self,
        parent: &OwnedFd,
        components: &[Vec<u8>],
        keep_dir: bool,
    ) -> Result<bool, ImageError> {
        let entry = display(components);
        let Some(name) = components.last() else {
            return Ok(false);
        };
        let existing = match statat(parent, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => FileType::from_raw_mode(st.st_mode),
            Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(self.io(&entry, e.into())),
        };
        if existing == FileType::Directory {
            if keep_dir {
                return Ok(true);
            }
            // Every parent was opened with O_NOFOLLOW and nothing else writes here, so this path
            // names the same directory; remove_dir_all does not follow symlinks inside it.
            let mut path = self.root_path.to_path_buf();
            for component in components {
                path.push(std::ffi::OsStr::from_bytes(component));
            }
            std::fs::remove_dir_all(&path).map_err(|e| self.io(&entry, e))?;
            self.dir_removed = true;
        } else {
            unlinkat(parent, name.as_slice(), AtFlags::empty())
                .map_err(|e| self.io(&entry, e.into()))?;
        }
        Ok(false)
    }

    fn directory(
        &mut self,
        parent: &OwnedFd,
        components: &[Vec<u8>],
        meta: Meta,
        xattrs: &[(String, Vec<u8>)],
    ) -> Result<(), ImageError> {
        let entry = display(components);
        let name = last(components);
        if !self.clear(parent, components, true)? {
            mkdirat(parent, name, Mode::from_raw_mode(0o755))
                .map_err(|e| self.io(&entry, e.into()))?;
        }
        if !xattrs.is_empty() {
            let fd = openat(parent, name, DIR_FLAGS, Mode::empty())
                .map_err(|e| self.io(&entry, e.into()))?;
            self.set_xattrs(&fd, &entry, xattrs)?;
        }
        self.dirs.push(DeferredDir {
            components: components.to_vec(),
            meta,
        });
        Ok(())
    }

    fn regular<R: Read>(
        &mut self,
        parent: &OwnedFd,
        components: &[Vec<u8>],
        meta: Meta,
        xattrs: &[(String, Vec<u8>)],
        data: &mut tar::Entry<'_, R>,
    ) -> Result<(), ImageError> {
        let entry = display(components);
        self.clear(parent, components, false)?;
        let fd = openat(
            parent,
            last(components),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| self.io(&entry, e.into()))?;
        let mut file = File::from(fd);
        self.copy_sparse(data, &mut file, &entry)?;
        self.set_owner(&file, &entry, meta)?;
        // After chown, which clears set-id bits.
        fchmod(&file, Mode::from_raw_mode(meta.mode)).map_err(|e| self.io(&entry, e.into()))?;
        self.set_xattrs(&file, &entry, xattrs)?;
        rustix::fs::futimens(&file, &timestamps(meta.mtime))
            .map_err(|e| self.io(&entry, e.into()))?;
        Ok(())
    }

    /// Copies an entry's data into `file`, seeking over zero-filled chunks instead of writing
    /// them (a sparse entry's holes stay holes), within [`MAX_LAYER_BYTES`] for the layer.
    fn copy_sparse(
        &mut self,
        data: &mut impl Read,
        file: &mut File,
        entry: &str,
    ) -> Result<(), ImageError> {
        const CHUNK: usize = 64 * 1024;
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.resize(CHUNK, 0);
        let mut length = 0u64;
        let mut ends_in_hole = false;
        let result = loop {
            let n = match data.read(&mut buffer) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(self.io(entry, e)),
            };
            length += n as u64;
            self.written += n as u64;
            if self.written > self.max_bytes {
                break Err(self.unsafe_entry(
                    entry,
                    format!(
                        "takes the layer past the {} a layer may unpack to",
                        size_shown(self.max_bytes)
                    ),
                ));
            }
            let chunk = &buffer[..n];
            ends_in_hole = chunk.iter().all(|&b| b == 0);
            let step = if ends_in_hole {
                file.seek(SeekFrom::Current(n as i64)).map(drop)
            } else {
                file.write_all(chunk)
            };
            if let Err(e) = step {
                break Err(self.io(entry, e));
            }
        };
        self.buffer = buffer;
        result?;
        if ends_in_hole {
            file.set_len(length).map_err(|e| self.io(entry, e))?;
        }
        Ok(())
    }

    fn symlink(
        &mut self,
        parent: &OwnedFd,
        components: &[Vec<u8>],
        meta: Meta,
        target: &[u8],
    ) -> Result<(), ImageError> {
        let entry = display(components);
        let name = last(components);
        self.clear(parent, components, false)?;
        symlinkat(target, parent, name).map_err(|e| self.io(&entry, e.into()))?;
        match rustix::fs::chownat(
            parent,
            name,
            uid(meta.uid),
            gid(meta.gid),
            AtFlags::SYMLINK_NOFOLLOW,
        ) {
            Ok(()) | Err(Errno::PERM | Errno::INVAL) => {}
            Err(e) => return Err(self.io(&entry, e.into())),
        }
        utimensat(
            parent,
            name,
            &timestamps(meta.mtime),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.io(&entry, e.into()))?;
        Ok(())
    }

    fn hardlink(
        &mut self,
        parent: &OwnedFd,
        components: &[Vec<u8>],
        target: &[u8],
    ) -> Result<(), ImageError> {
        let entry = display(components);
        let shown = String::from_utf8_lossy(target).into_owned();
        let target_components = split_path(target).map_err(|reason| {
            self.unsafe_entry(
                &entry,
                format!("is a hard link whose target \"{shown}\" {reason}"),
            )
        })?;
        let Some((target_name, target_parents)) = target_components.split_last() else {
            return Err(self.unsafe_entry(&entry, "is a hard link to the layer root"));
        };
        if target_components == components {
            return Ok(());
        }
        let target_dir = self
            .walk(target_parents, &entry, false)
            .map_err(|e| match e {
                ImageError::UnsafeEntry { reason, .. } => self.unsafe_entry(
                    &entry,
                    format!("is a hard link whose target \"{shown}\" {reason}"),
                ),
                other => other,
            })?;
        match statat(
            &target_dir,
            target_name.as_slice(),
            AtFlags::SYMLINK_NOFOLLOW,
        ) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                return Err(
                    self.unsafe_entry(&entry, format!("is a hard link to directory \"{shown}\""))
                );
            }
            Ok(_) => {}
            Err(Errno::NOENT) => {
                return Err(self.unsafe_entry(
                    &entry,
                    format!("is a hard link to \"{shown}\", which is not earlier in the layer"),
                ));
            }
            Err(e) => return Err(self.io(&entry, e.into())),
        }
        self.clear(parent, components, false)?;
        linkat(
            &target_dir,
            target_name.as_slice(),
            parent,
            last(components),
            AtFlags::empty(),
        )
        .map_err(|e| self.io(&entry, e.into()))?;
        Ok(())
    }

    fn fifo(
        &mut self,
        parent: &OwnedFd,
        components: &[Vec<u8>],
        meta: Meta,
    ) -> Result<(), ImageError> {
        let entry = display(components);
        self.clear(parent, components, false)?;
        let name = last(components);
        mknodat(
            parent,
            name,
            FileType::Fifo,
            Mode::from_raw_mode(meta.mode),
            0,
        )
        .map_err(|e| self.io(&entry, e.into()))?;
        match rustix::fs::chownat(
            parent,
            name,
            uid(meta.uid),
            gid(meta.gid),
            AtFlags::SYMLINK_NOFOLLOW,
        ) {
            Ok(()) | Err(Errno::PERM | Errno::INVAL) => Ok(()),
            Err(e) => Err(self.io(&entry, e.into())),
        }
    }

    /// `.wh..wh..opq` marks its directory opaque; `.wh.NAME` hides NAME of lower layers.
    fn whiteout(
        &mut self,
        parents: &[Vec<u8>],
        target: &[u8],
        entry: &str,
    ) -> Result<(), ImageError> {
        let parent = self.open_parent(parents, entry)?;
        let result = if target == b".wh..opq" {
            fsetxattr(&parent, "trusted.overlay.opaque", b"y", XattrFlags::empty())
                .map_err(|e| self.io(entry, e.into()))
        } else if target.starts_with(b".wh.") {
            // Other `.wh..wh.*` names are aufs bookkeeping (hard-link directories): not content.
            tracing::debug!(layer = self.layer, entry, "skipping aufs metadata entry");
            Ok(())
        } else if target.is_empty() {
            Err(self.unsafe_entry(entry, "is a whiteout without a name"))
        } else {
            // A whiteout only hides lower layers: if this layer already has NAME, NAME wins.
            match statat(&parent, target, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(_) => Ok(()),
                Err(Errno::NOENT) => mknodat(
                    &parent,
                    target,
                    FileType::CharacterDevice,
                    Mode::empty(),
                    makedev(0, 0),
                )
                .map_err(|e| self.io(entry, e.into())),
                Err(e) => Err(self.io(entry, e.into())),
            }
        };
        self.cache = Some((parents.to_vec(), parent));
        result
    }

    fn set_owner(&self, fd: impl AsFd, entry: &str, meta: Meta) -> Result<(), ImageError> {
        match fchown(fd, uid(meta.uid), gid(meta.gid)) {
            Ok(()) => Ok(()),
            // Not root, or an id the user namespace does not map: keep our own ids.
            Err(Errno::PERM | Errno::INVAL) => {
                tracing::debug!(
                    layer = self.layer,
                    entry,
                    uid = meta.uid,
                    gid = meta.gid,
                    "cannot chown"
                );
                Ok(())
            }
            Err(e) => Err(self.io(entry, e.into())),
        }
    }

    /// Applies `user.*` and `security.capability` attributes. Others are dropped: `trusted.*`
    /// (notably `trusted.overlay.*`) from an image could redirect overlayfs lookups.
    fn set_xattrs(
        &self,
        fd: impl AsFd,
        entry: &str,
        xattrs: &[(String, Vec<u8>)],
    ) -> Result<(), ImageError> {
        for (name, value) in xattrs {
            if !(name.starts_with("user.") || name == "security.capability") {
                tracing::debug!(layer = self.layer, entry, xattr = %name, "skipping xattr");
                continue;
            }
            match fsetxattr(&fd, name.as_str(), value, XattrFlags::empty()) {
                Ok(()) => {}
                Err(Errno::OPNOTSUPP | Errno::PERM) => {
                    tracing::debug!(layer = self.layer, entry, xattr = %name, "xattr not supported here");
                }
                Err(e) => return Err(self.io(entry, e.into())),
            }
        }
        Ok(())
    }

    /// Applies directory metadata, deepest first, now that nothing more is written into them.
    fn finish(&mut self) -> Result<(), ImageError> {
        self.cache = None;
        let dirs = std::mem::take(&mut self.dirs);
        // Newest first, each directory once: a directory listed twice gets its last entry's
        // mode, as tar applies them (a later `secret/` 0700 tightens an earlier 0755).
        let mut done = std::collections::HashSet::new();
        for dir in dirs.iter().rev() {
            if !done.insert(&dir.components) {
                continue;
            }
            let entry = display(&dir.components);
            let Some((name, parents)) = dir.components.split_last() else {
                continue;
            };
            // A later entry may have replaced the directory (by a symlink, even): then the
            // walk or the O_NOFOLLOW open fails, and there is nothing to apply.
            let Ok(parent) = self.walk(parents, &entry, false) else {
                continue;
            };
            let Ok(fd) = openat(&parent, name.as_slice(), DIR_FLAGS, Mode::empty()) else {
                continue;
            };
            self.apply_dir_meta(&fd, &entry, dir.meta)?;
        }
        let root = openat(&self.root, ".", DIR_FLAGS, Mode::empty())
            .map_err(|e| self.io("./", e.into()))?;
        let meta = self.root_meta.unwrap_or(Meta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
        });
        self.apply_dir_meta(&root, "./", meta)
    }

    fn apply_dir_meta(&self, fd: &OwnedFd, entry: &str, meta: Meta) -> Result<(), ImageError> {
        self.set_owner(fd, entry, meta)?;
        fchmod(fd, Mode::from_raw_mode(meta.mode)).map_err(|e| self.io(entry, e.into()))?;
        rustix::fs::futimens(fd, &timestamps(meta.mtime)).map_err(|e| self.io(entry, e.into()))
    }
}

fn last(components: &[Vec<u8>]) -> &[u8] {
    components.last().map(Vec::as_slice).unwrap_or(b".")
}

fn uid(raw: u32) -> Option<Uid> {
    (raw != u32::MAX).then(|| Uid::from_raw(raw))
}

fn gid(raw: u32) -> Option<Gid> {
    (raw != u32::MAX).then(|| Gid::from_raw(raw))
}

fn parse_decimal(value: &[u8]) -> Option<u32> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

fn timestamps(mtime: u64) -> Timestamps {
    let time = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(0),
        tv_nsec: 0,
    };
    Timestamps {
        last_access: time,
        last_modification: time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_path_rules() {
        let ok = |s: &str| split_path(s.as_bytes()).unwrap();
        assert_eq!(ok("./bin//sh"), vec![b"bin".to_vec(), b"sh".to_vec()]);
        assert!(ok("./").is_empty());
        assert!(ok("").is_empty());
        assert_eq!(ok("a/./b/"), vec![b"a".to_vec(), b"b".to_vec()]);
        assert!(split_path(b"/etc/passwd").unwrap_err().contains("absolute"));
        assert!(
            split_path(b"../../etc/passwd")
                .unwrap_err()
                .contains("escapes the rootfs")
        );
        assert!(split_path(b"a/../../b").is_err());
        assert!(split_path(b"a/..").is_err());
        // `..` as part of a longer name is just a name.
        assert_eq!(ok("a/..b"), vec![b"a".to_vec(), b"..b".to_vec()]);
    }

    /// A tar of `entries` (header, data) as the layer blob in a temp dir, with an empty
    /// destination beside it.
    fn layer(entries: Vec<(tar::Header, Vec<u8>)>) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut builder = tar::Builder::new(Vec::new());
        for (mut header, data) in entries {
            header.set_cksum();
            builder.append(&header, data.as_slice()).expect("append");
        }
        let blob = dir.path().join("layer.tar");
        std::fs::write(&blob, builder.into_inner().expect("tar")).expect("write blob");
        let dest = dir.path().join("rootfs");
        std::fs::create_dir(&dest).expect("dest");
        (dir, dest)
    }

    fn file_header(name: &str, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_path(name).expect("name");
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(size);
        header
    }

    /// A GNU long-name record for `name`, as GNU tar writes one before the entry it names.
    fn long_name(name: &[u8]) -> (tar::Header, Vec<u8>) {
        let mut data = name.to_vec();
        data.push(0);
        let mut header = file_header("././@LongLink", data.len() as u64);
        header.set_entry_type(tar::EntryType::GNULongName);
        (header, data)
    }

    fn error_text(e: &ImageError) -> String {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }

    #[test]
    fn long_names_are_capped_before_they_are_read_whole() {
        // A 2 MiB long name: refused once the header budget is spent, not read into memory.
        let name = vec![b'a'; 2 << 20];
        let (dir, dest) = layer(vec![
            long_name(&name),
            (file_header("short", 1), b"x".to_vec()),
        ]);
        let err = unpack_layer(&dir.path().join("layer.tar"), &dest, "L1").unwrap_err();
        let text = error_text(&err);
        assert!(
            text.contains("1024 KiB of tar headers before one entry"),
            "{text}"
        );
        assert!(text.contains("<header after <start of archive>>"), "{text}");
        assert!(
            text.len() < 1024,
            "the name is not quoted whole: {} bytes",
            text.len()
        );
        assert_eq!(std::fs::read_dir(&dest).expect("dest").count(), 0);

        // A name within the budget but past PATH_MAX: refused, shown cut short.
        let name = [b"dir/".as_slice(), &[b'b'; 5000]].concat();
        let (dir, dest) = layer(vec![
            long_name(&name),
            (file_header("short", 1), b"x".to_vec()),
        ]);
        let err = unpack_layer(&dir.path().join("layer.tar"), &dest, "L2").unwrap_err();
        let text = error_text(&err);
        assert!(
            text.contains("longer than the 4096 bytes a path may have"),
            "{text}"
        );
        assert!(text.contains("... (5004 bytes)"), "{text}");
        assert_eq!(std::fs::read_dir(&dest).expect("dest").count(), 0);

        // A long name of a normal length still works, and entries after it too.
        let name = format!("{}/file", "d".repeat(200));
        let (dir, dest) = layer(vec![
            long_name(name.as_bytes()),
            (file_header("short", 2), b"hi".to_vec()),
            (file_header("next", 3), b"yes".to_vec()),
        ]);
        unpack_layer(&dir.path().join("layer.tar"), &dest, "L3").expect("unpacks");
        assert_eq!(std::fs::read(dest.join(&name)).expect("long"), b"hi");
        assert_eq!(std::fs::read(dest.join("next")).expect("next"), b"yes");
    }

    /// A GNU sparse entry `name` of `real_size` bytes whose only data is `data` at its end.
    fn sparse(name: &str, real_size: u64, data: &[u8]) -> (tar::Header, Vec<u8>) {
        let mut header = file_header(name, data.len() as u64);
        header.set_entry_type(tar::EntryType::GNUSparse);
        let gnu = header.as_gnu_mut().expect("gnu");
        gnu.set_real_size(real_size);
        gnu.sparse[0].set_offset(real_size - data.len() as u64);
        gnu.sparse[0].set_length(data.len() as u64);
        (header, data.to_vec())
    }

    #[test]
    fn sparse_entries_stay_sparse_and_count_against_the_layer_cap() {
        use std::os::unix::fs::MetadataExt as _;
        let real = 256 << 20;
        let tail = vec![b'x'; 4096];
        let (dir, dest) = layer(vec![sparse("holes", real, &tail)]);
        let blob = dir.path().join("layer.tar");
        unpack_layer(&blob, &dest, "S1").expect("unpacks");
        let meta = std::fs::metadata(dest.join("holes")).expect("holes");
        assert_eq!(meta.len(), real);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "a 256 MiB hole takes {} bytes on disk",
            meta.blocks() * 512
        );
        let mut file = File::open(dest.join("holes")).expect("open");
        file.seek(SeekFrom::Start(real - 4096)).expect("seek");
        let mut end = Vec::new();
        file.read_to_end(&mut end).expect("read");
        assert_eq!(end, tail);

        // The same entry in a layer capped at 1 MiB: the holes count, the entry is refused.
        let dest = dir.path().join("capped");
        std::fs::create_dir(&dest).expect("dest");
        let err = unpack_within(&blob, &dest, "S2", 1 << 20).unwrap_err();
        let text = error_text(&err);
        assert!(
            text.contains("layer S2 entry \"holes\" takes the layer past the 1 MiB"),
            "{text}"
        );
    }

    #[test]
    fn a_pax_global_header_is_skipped_unread() {
        // 2 MiB of what is not PAX records: parsing it (after reading it whole) failed.
        let mut global = file_header("pax_global_header", 2 << 20);
        global.set_entry_type(tar::EntryType::XGlobalHeader);
        let (dir, dest) = layer(vec![
            (global, vec![b'z'; 2 << 20]),
            (file_header("after", 2), b"ok".to_vec()),
        ]);
        unpack_layer(&dir.path().join("layer.tar"), &dest, "G").expect("unpacks");
        assert_eq!(std::fs::read(dest.join("after")).expect("after"), b"ok");
        assert!(!dest.join("pax_global_header").exists());
    }

    #[test]
    fn trailing_and_all_zero_files_keep_their_length() {
        use std::os::unix::fs::MetadataExt as _;
        let tail = [b"data".as_slice(), &[0u8; 128 << 10]].concat();
        let zeros = vec![0u8; 200 << 10];
        let (dir, dest) = layer(vec![
            (file_header("tail", tail.len() as u64), tail.clone()),
            (file_header("zeros", zeros.len() as u64), zeros.clone()),
        ]);
        unpack_layer(&dir.path().join("layer.tar"), &dest, "Z").expect("unpacks");
        assert_eq!(std::fs::read(dest.join("tail")).expect("tail"), tail);
        assert_eq!(std::fs::read(dest.join("zeros")).expect("zeros"), zeros);
        let meta = std::fs::metadata(dest.join("zeros")).expect("zeros");
        assert!(meta.blocks() * 512 < 200 << 10, "all zeros is a hole");
    }

    #[test]
    fn a_directory_listed_twice_gets_its_last_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = |name: &str, mode: u32| {
            let mut header = file_header(name, 0);
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(mode);
            (header, Vec::new())
        };
        let (tmp, dest) = layer(vec![
            dir("secret/", 0o755),
            (file_header("secret/key", 1), b"k".to_vec()),
            dir("secret/", 0o700),
            dir("open/", 0o700),
            dir("open/", 0o751),
        ]);
        unpack_layer(&tmp.path().join("layer.tar"), &dest, "D").expect("unpacks");
        let mode = |p: &str| {
            std::fs::metadata(dest.join(p))
                .expect(p)
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("secret"), 0o700);
        assert_eq!(mode("open"), 0o751);
    }

    #[test]
    fn the_uncompressed_stream_is_capped() {
        let data = vec![7u8; 3 << 20];
        let (dir, dest) = layer(vec![(file_header("big", data.len() as u64), data)]);
        let err = unpack_within(&dir.path().join("layer.tar"), &dest, "B", 2 << 20).unwrap_err();
        let text = error_text(&err);
        assert!(
            text.contains("larger than the 2 MiB a layer may unpack to"),
            "{text}"
        );
        // Under the cap it unpacks, every byte written.
        let dest = dir.path().join("roomy");
        std::fs::create_dir(&dest).expect("dest");
        unpack_within(&dir.path().join("layer.tar"), &dest, "B", 4 << 20).expect("unpacks");
        assert_eq!(
            std::fs::read(dest.join("big")).expect("big"),
            vec![7u8; 3 << 20]
        );
    }
}
