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

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{
    AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid, XattrFlags, fchmod, fchown,
    fsetxattr, linkat, makedev, mkdirat, mknodat, openat, statat, symlinkat, unlinkat, utimensat,
};
use rustix::io::Errno;
use sha2::{Digest as _, Sha256};

use crate::error::ImageError;
use crate::reference::Digest;

pub(crate) const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Unpacks the layer blob at `blob` (tar, tar+gzip or tar+zstd) into the existing empty
/// directory `dest`, returning the sha256 of the uncompressed tar (the layer's diff_id).
/// `layer` names the layer in errors. On error `dest` may hold a partial tree: the caller
/// removes it.
pub(crate) fn unpack_layer(blob: &Path, dest: &Path, layer: &str) -> Result<Digest, ImageError> {
    let file = File::open(blob).map_err(|e| ImageError::io("opening layer blob", blob, e))?;
    let reader = decompress(file).map_err(|e| ImageError::Unpack {
        layer: layer.to_string(),
        entry: "<compression header>".to_string(),
        source: e,
    })?;
    let mut archive = tar::Archive::new(HashingReader::new(reader));
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
    };
    let entries = archive
        .entries()
        .map_err(|e| extractor.io("<archive>", e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| extractor.io("<next header>", e))?;
        extractor.entry(&mut entry)?;
    }
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

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
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
}

fn display(components: &[Vec<u8>]) -> String {
    let joined: Vec<u8> = components.join(&b'/');
    String::from_utf8_lossy(&joined).into_owned()
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

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ImageError> {
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let components = split_path(&raw).map_err(|reason| self.unsafe_entry(&name, reason))?;
        let header = entry.header();
        let kind = header.entry_type();
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
            return Ok(());
        };
        if let Some(target) = file_name.strip_prefix(b".wh.") {
            return self.whiteout(parents, target, &name);
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
            return Ok(());
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
        result
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
        io::copy(data, &mut file).map_err(|e| self.io(&entry, e))?;
        self.set_owner(&file, &entry, meta)?;
        // After chown, which clears set-id bits.
        fchmod(&file, Mode::from_raw_mode(meta.mode)).map_err(|e| self.io(&entry, e.into()))?;
        self.set_xattrs(&file, &entry, xattrs)?;
        rustix::fs::futimens(&file, &timestamps(meta.mtime))
            .map_err(|e| self.io(&entry, e.into()))?;
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
        for dir in dirs.iter().rev() {
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
}
