//! Importing an OCI image layout, from a directory or a (gzipped) tar of one.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::ImageSummary;
use crate::error::{ImageError, io_err};
use crate::oci::{self, AnyManifest, Descriptor, Index, Manifest};
use crate::reference::{self, Digest, Reference};
use crate::store::{
    ImageRecord, ImageStore, MAX_JSON_BLOB, TempDir, sha256_hex, verify_digest, verify_size,
};
use crate::{unpack, wasm};

/// How deep an index may nest other indexes before we call it a loop.
const MAX_INDEX_DEPTH: usize = 4;

/// One image found in a layout.
struct Found {
    digest: Digest,
    bytes: Vec<u8>,
    manifest: Manifest,
    names: Vec<String>,
}

impl ImageStore {
    /// Imports an OCI image layout, given as a directory or a `.tar` of one (optionally gzip
    /// or zstd compressed). Every image the layout's `index.json` lists is imported.
    ///
    /// Names come from the `org.opencontainers.image.ref.name` annotations: a full reference
    /// (`docker.io/library/busybox:1.36`) is used as is (normalized); a bare tag (`latest`) needs
    /// `name` and becomes `name:tag`. `name` with a tag (`app:v1`) names the image outright
    /// (the layout must then hold one image); without a tag it replaces the repository of
    /// every image's annotation. An image that ends up with no name is refused.
    ///
    /// A file that is a WebAssembly module (it starts with `\0asm`, or is named `*.wasm` or
    /// `*.wat`) is imported with [`ImageStore::import_wasm`] instead, under `name` (required).
    pub fn import(&self, path: &Path, name: Option<&str>) -> Result<Vec<ImageSummary>, ImageError> {
        let meta = fs::metadata(path).map_err(io_err!("reading", path))?;
        if !meta.is_dir() && !meta.is_file() {
            return Err(ImageError::InvalidLayout {
                path: path.to_path_buf(),
                reason: "is neither a directory nor a regular file (a layout, a tar of one or \
                         a Wasm module)"
                    .to_string(),
            });
        }
        if !meta.is_dir() && wasm::looks_like_module(path)? {
            let Some(name) = name else {
                return Err(ImageError::InvalidName {
                    name: String::new(),
                    reason: format!(
                        "{} is a Wasm module, which carries no name: give one to import it under",
                        path.display()
                    ),
                });
            };
            return Ok(vec![self.import_wasm(path, name)?]);
        }
        let name = name.map(Reference::parse).transpose()?;
        let _gc = self.lock_gc_shared()?;
        let staged: Option<TempDir>;
        let layout = if meta.is_dir() {
            path
        } else {
            staged = Some(self.stage_tar(path)?);
            staged.as_ref().map_or(path, |s| s.path())
        };
        let found = self.find_images(layout, path, name.as_ref())?;
        let mut summaries = Vec::with_capacity(found.len());
        for image in found {
            summaries.push(self.import_image(layout, path, image)?);
        }
        Ok(summaries)
    }

    /// Reads `index.json` and works out which manifests to import under which names.
    fn find_images(
        &self,
        layout: &Path,
        shown: &Path,
        name: Option<&Reference>,
    ) -> Result<Vec<Found>, ImageError> {
        let invalid = |reason: String| ImageError::InvalidLayout {
            path: shown.to_path_buf(),
            reason,
        };
        let index_path = layout.join("index.json");
        let bytes = read_limited(&index_path, MAX_JSON_BLOB).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                invalid("has no index.json (is it an OCI image layout?)".to_string())
            }
            _ => ImageError::io("reading", &index_path, e),
        })?;
        let index: Index =
            serde_json::from_slice(&bytes).map_err(|e| ImageError::json("index.json", e))?;
        if index.manifests.is_empty() {
            return Err(invalid("index.json lists no manifests".to_string()));
        }
        let mut found: Vec<Found> = Vec::new();
        for descriptor in &index.manifests {
            let ref_name = descriptor.annotation(oci::REF_NAME);
            let (digest, bytes, manifest) = self.layout_manifest(layout, shown, descriptor, 0)?;
            let names = match name {
                Some(given) if given.tag.is_some() || given.digest.is_some() => {
                    vec![given.familiar()]
                }
                Some(given) => {
                    let tag = match ref_name {
                        None => "latest".to_string(),
                        Some(r) if reference::is_tag(r) => r.to_string(),
                        Some(r) => Reference::parse(r)?
                            .tag
                            .unwrap_or_else(|| "latest".to_string()),
                    };
                    vec![format!("{}:{tag}", given.familiar_repository())]
                }
                None => match ref_name {
                    Some(r) if reference::is_tag(r) && !r.contains(['/', ':', '@']) => {
                        return Err(invalid(format!(
                            "manifest {digest} is tagged \"{r}\" with no repository: give a name to import it under"
                        )));
                    }
                    Some(r) => vec![reference::normalize_name(r)?],
                    None => {
                        return Err(invalid(format!(
                            "manifest {digest} has no {} annotation: give a name to import it under",
                            oci::REF_NAME
                        )));
                    }
                },
            };
            match found.iter_mut().find(|f| f.digest == digest) {
                Some(existing) => existing.names.extend(names),
                None => found.push(Found {
                    digest,
                    bytes,
                    manifest,
                    names,
                }),
            }
        }
        let mut owner: BTreeMap<&str, &Digest> = BTreeMap::new();
        for image in &found {
            for n in &image.names {
                if let Some(previous) = owner.insert(n, &image.digest)
                    && previous != &image.digest
                {
                    return Err(invalid(format!(
                        "the name \"{n}\" would go to two different images ({previous} and {}); \
                         give a name without a tag, or import them separately",
                        image.digest
                    )));
                }
            }
        }
        for image in &mut found {
            image.names.sort();
            image.names.dedup();
        }
        Ok(found)
    }

    /// Follows a descriptor from an index to an image manifest, through nested indexes
    /// (picking linux/amd64).
    fn layout_manifest(
        &self,
        layout: &Path,
        shown: &Path,
        descriptor: &Descriptor,
        depth: usize,
    ) -> Result<(Digest, Vec<u8>, Manifest), ImageError> {
        let digest = descriptor.digest()?;
        let bytes = read_layout_json(layout, shown, descriptor)?;
        match oci::parse_any_manifest(&bytes, &format!("manifest {digest}"))? {
            AnyManifest::Image(manifest) => Ok((digest, bytes, manifest)),
            AnyManifest::Index(_) if depth >= MAX_INDEX_DEPTH => Err(ImageError::InvalidLayout {
                path: shown.to_path_buf(),
                reason: format!("indexes nest more than {MAX_INDEX_DEPTH} deep at {digest}"),
            }),
            AnyManifest::Index(index) => {
                let chosen = oci::pick_platform(&index, &shown.display().to_string())?;
                self.layout_manifest(layout, shown, chosen, depth + 1)
            }
        }
    }

    fn import_image(
        &self,
        layout: &Path,
        shown: &Path,
        image: Found,
    ) -> Result<ImageSummary, ImageError> {
        let what = format!("manifest {}", image.digest);
        let config_bytes = read_layout_json(layout, shown, &image.manifest.config)?;
        let record = ImageRecord::new(&image.manifest, &config_bytes, &what)?;
        self.put_blob_bytes(&image.digest, &image.bytes)?;
        self.put_blob_bytes(&image.manifest.config.digest()?, &config_bytes)?;
        for descriptor in &image.manifest.layers {
            let digest = descriptor.digest()?;
            if !self.has_blob_of_size(&digest, descriptor.declared_size())? {
                let path = layout_blob_path(layout, &digest);
                let mut file = open_layout_blob(&path, shown, &digest)?;
                self.put_blob_reader(&digest, descriptor.declared_size(), &mut file, &path)?;
            }
        }
        for layer in &record.layers {
            self.ensure_layer(layer)?;
        }
        if let Some(module) = &record.wasm {
            self.check_wasm_blob(module)?;
        }
        let summary = self.register(&image.digest, record, &image.names)?;
        tracing::info!(id = %summary.id, names = ?summary.names, "imported image");
        Ok(summary)
    }

    /// Copies the parts of a layout tar that matter (`index.json`, `oci-layout` and
    /// `blobs/sha256/<hex>`) into a temp dir. Nothing is written under a name taken from the
    /// tar: the destination paths are built from validated digests.
    fn stage_tar(&self, path: &Path) -> Result<TempDir, ImageError> {
        let invalid = |reason: String| ImageError::InvalidLayout {
            path: path.to_path_buf(),
            reason,
        };
        let file = crate::open_regular(path, false).map_err(io_err!("opening", path))?;
        let reader = unpack::decompress(file).map_err(io_err!("reading", path))?;
        let staged = self.temp_dir("import")?;
        let blobs = staged.path().join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(io_err!("creating", &blobs))?;
        let mut archive = tar::Archive::new(reader);
        let mut saw_index = false;
        for entry in archive.entries().map_err(io_err!("reading", path))? {
            let mut entry = entry.map_err(io_err!("reading", path))?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let Ok(components) = unpack::split_path(&entry.path_bytes()) else {
                continue;
            };
            let names: Vec<&[u8]> = components.iter().map(Vec::as_slice).collect();
            let dest: PathBuf = match names.as_slice() {
                [b"index.json"] => {
                    saw_index = true;
                    staged.path().join("index.json")
                }
                [b"oci-layout"] => staged.path().join("oci-layout"),
                [b"blobs", b"sha256", hex] => {
                    match std::str::from_utf8(hex).ok().map(Digest::from_hex) {
                        Some(Ok(digest)) => blobs.join(digest.hex()),
                        _ => continue,
                    }
                }
                _ => continue,
            };
            let mut out = File::create(&dest).map_err(io_err!("creating", &dest))?;
            io::copy(&mut entry, &mut out).map_err(io_err!("extracting layout tar", path))?;
        }
        if !saw_index {
            return Err(invalid(
                "the tar has no index.json at its top level (is it an OCI image layout?)"
                    .to_string(),
            ));
        }
        Ok(staged)
    }
}

fn layout_blob_path(layout: &Path, digest: &Digest) -> PathBuf {
    layout.join("blobs/sha256").join(digest.hex())
}

/// Opens a layout blob without following a symlink in its last component: a layout handed to
/// the store must not make it read some other file of the host.
fn open_layout_blob(path: &Path, shown: &Path, digest: &Digest) -> Result<File, ImageError> {
    crate::open_regular(path, true).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ImageError::InvalidLayout {
            path: shown.to_path_buf(),
            reason: format!("blob {digest} is missing"),
        },
        _ => ImageError::io("opening", path, e),
    })
}

/// Reads a small (JSON) blob of the layout and checks it against its descriptor.
fn read_layout_json(
    layout: &Path,
    shown: &Path,
    descriptor: &Descriptor,
) -> Result<Vec<u8>, ImageError> {
    let digest = descriptor.digest()?;
    let path = layout_blob_path(layout, &digest);
    let mut bytes = Vec::new();
    open_layout_blob(&path, shown, &digest)?
        .take(MAX_JSON_BLOB)
        .read_to_end(&mut bytes)
        .map_err(io_err!("reading", &path))?;
    verify_size(&digest, descriptor.declared_size(), bytes.len() as u64)?;
    verify_digest("blob", &digest, &sha256_hex(&bytes))?;
    Ok(bytes)
}

fn read_limited(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    crate::open_regular(path, false)?
        .take(limit)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}
