//! Test helpers: OCI image layouts built on the fly, for this crate's tests and for other crates'
//! (which depend on `warren-image` as a dev-dependency).
//!
//! `busybox_layout`, `write_layout`, `wasm_layout` and `wasm_in_scratch_layout` write the layout into the directory they are given
//! (created if missing) and return it; `malicious_layout` makes `<dir>/malicious-<kind>.oci`
//! next to its sentinel. Output is deterministic (fixed times, owners and gzip headers): the
//! same entries always make the same layer digest, which is how tests get two images sharing a
//! layer.

#![doc(hidden)]

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest as _, Sha256};

const MTIME: u64 = 1_700_000_000;
const CREATED: &str = "2024-01-01T00:00:00Z";

/// One tar entry. Names and link targets are written verbatim, unchecked, so tests can build
/// hostile layers.
#[derive(Debug, Clone)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
    Hardlink {
        path: String,
        target: String,
    },
    CharDevice {
        path: String,
        major: u32,
        minor: u32,
    },
}

impl Entry {
    pub fn dir(path: &str, mode: u32) -> Entry {
        Entry::Dir {
            path: path.to_string(),
            mode,
        }
    }

    pub fn file(path: &str, mode: u32, data: &[u8]) -> Entry {
        Entry::File {
            path: path.to_string(),
            mode,
            data: data.to_vec(),
        }
    }

    pub fn symlink(path: &str, target: &str) -> Entry {
        Entry::Symlink {
            path: path.to_string(),
            target: target.to_string(),
        }
    }

    pub fn hardlink(path: &str, target: &str) -> Entry {
        Entry::Hardlink {
            path: path.to_string(),
            target: target.to_string(),
        }
    }
}

/// How a test layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// A layer for [`write_layout`].
#[derive(Debug, Clone)]
pub struct Layer {
    pub entries: Vec<Entry>,
    pub compression: Compression,
}

impl Layer {
    pub fn gzip(entries: Vec<Entry>) -> Layer {
        Layer {
            entries,
            compression: Compression::Gzip,
        }
    }
}

/// The runtime config written into a test image.
#[derive(Debug, Clone)]
pub struct Config {
    pub env: Vec<String>,
    pub cmd: Vec<String>,
    pub entrypoint: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            env: vec!["PATH=/usr/bin:/bin".to_string()],
            cmd: vec!["sh".to_string()],
            entrypoint: Vec::new(),
            working_dir: None,
            user: None,
        }
    }
}

/// Builds an OCI image layout in `dir` (created if missing; returned) from `/bin/busybox` (Debian's `busybox-static`): one gzip layer with
/// bin/busybox, the usual applet symlinks, empty etc, tmp (1777), proc, sys, dev, root, and a
/// minimal etc/passwd and etc/group. Config: `PATH=/usr/bin:/bin`, `Cmd ["sh"]`. The index's
/// ref-name annotation is `name`, normalized (`busybox` -> `busybox:latest`).
pub fn busybox_layout(dir: &Path, name: &str) -> io::Result<PathBuf> {
    busybox_layout_with(dir, name, Vec::new())
}

/// [`busybox_layout`] with `extra` entries in its layer (after the usual ones): another
/// image of the same tools, `etc/release` telling versions apart.
pub fn busybox_layout_with(dir: &Path, name: &str, extra: Vec<Entry>) -> io::Result<PathBuf> {
    busybox_layout_stacked(dir, name, extra, Vec::new())
}

/// [`busybox_layout_with`] with `above`, more layers stacked on the busybox one (bottom
/// first).
pub fn busybox_layout_stacked(
    dir: &Path,
    name: &str,
    extra: Vec<Entry>,
    above: Vec<Layer>,
) -> io::Result<PathBuf> {
    let busybox = fs::read("/bin/busybox").map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("reading /bin/busybox (apt-get install busybox-static): {e}"),
        )
    })?;
    let mut entries = vec![
        Entry::dir("bin", 0o755),
        Entry::file("bin/busybox", 0o755, &busybox),
    ];
    for applet in [
        "sh", "true", "echo", "cat", "sleep", "ls", "mkdir", "id", "hostname", "env", "pwd", "ps",
        "head", "dd", "yes", "touch", "rm", "mount", "tar",
    ] {
        entries.push(Entry::symlink(&format!("bin/{applet}"), "busybox"));
    }
    for (path, mode) in [
        ("etc", 0o755),
        ("tmp", 0o1777),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("root", 0o700),
    ] {
        entries.push(Entry::dir(path, mode));
    }
    entries.push(Entry::file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    ));
    entries.push(Entry::file(
        "etc/group",
        0o644,
        b"root:x:0:\nnobody:x:65534:\n",
    ));
    entries.extend(extra);
    let mut layers = vec![Layer::gzip(entries)];
    layers.extend(above);
    write_layout(dir, Some(name), &layers, &Config::default())
}

/// Writes an OCI image layout into `layout` (created if missing; returned) with one image made
/// of `layers` (bottom first). `name`, normalized, becomes the ref-name annotation; `None`
/// leaves it out.
pub fn write_layout(
    layout: &Path,
    name: Option<&str>,
    layers: &[Layer],
    config: &Config,
) -> io::Result<PathBuf> {
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let mut layer_descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for layer in layers {
        let tar = layer_tar(&layer.entries)?;
        diff_ids.push(format!("sha256:{}", hex(&tar)));
        let (blob, media_type) = match layer.compression {
            Compression::None => (tar, "application/vnd.oci.image.layer.v1.tar"),
            Compression::Gzip => (gzip(&tar)?, "application/vnd.oci.image.layer.v1.tar+gzip"),
            Compression::Zstd => (
                ruzstd::encoding::compress_to_vec(
                    tar.as_slice(),
                    ruzstd::encoding::CompressionLevel::Fastest,
                ),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
        };
        layer_descriptors.push(write_blob(&blobs, media_type, &blob)?);
    }
    let mut container = json!({ "Env": config.env, "Cmd": config.cmd });
    if !config.entrypoint.is_empty() {
        container["Entrypoint"] = json!(config.entrypoint);
    }
    if let Some(dir) = &config.working_dir {
        container["WorkingDir"] = json!(dir);
    }
    if let Some(user) = &config.user {
        container["User"] = json!(user);
    }
    let config_json = json!({
        "created": CREATED,
        "architecture": "amd64",
        "os": "linux",
        "config": container,
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": [{ "created": CREATED, "created_by": "warren-image testing" }],
    });
    let config_descriptor = write_blob(&blobs, crate::oci::OCI_CONFIG, &to_vec(&config_json)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": crate::oci::OCI_MANIFEST,
        "config": config_descriptor,
        "layers": layer_descriptors,
    });
    let mut manifest_descriptor =
        write_blob(&blobs, crate::oci::OCI_MANIFEST, &to_vec(&manifest)?)?;
    manifest_descriptor["platform"] = json!({ "architecture": "amd64", "os": "linux" });
    write_index(layout, manifest_descriptor, name)?;
    Ok(layout.to_path_buf())
}

/// Writes `index.json` (listing the one manifest `descriptor`, annotated with `name`
/// normalized) and `oci-layout`.
fn write_index(
    layout: &Path,
    mut descriptor: serde_json::Value,
    name: Option<&str>,
) -> io::Result<()> {
    if let Some(name) = name {
        let normalized = crate::normalize_name(name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        descriptor["annotations"] = json!({ crate::oci::REF_NAME: normalized });
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": crate::oci::OCI_INDEX,
        "manifests": [descriptor],
    });
    fs::write(layout.join("index.json"), to_vec(&index)?)?;
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
}

/// Writes an OCI image layout into `layout` (created if missing; returned) holding one Wasm OCI
/// artifact for `module` (bytes written as they are, unchecked): a
/// `application/vnd.wasm.config.v0+json` config and one `application/wasm` layer, the same
/// blobs [`crate::ImageStore::import_wasm`] makes. `name`, normalized, becomes the ref-name
/// annotation.
pub fn wasm_layout(layout: &Path, name: &str, module: &[u8]) -> io::Result<PathBuf> {
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let artifact = crate::wasm::Artifact::new(module).map_err(io::Error::other)?;
    write_blob(&blobs, crate::oci::WASM_LAYER, module)?;
    write_blob(&blobs, crate::oci::WASM_CONFIG, &artifact.config)?;
    let descriptor = write_blob(&blobs, crate::oci::OCI_MANIFEST, &artifact.manifest)?;
    write_index(layout, descriptor, Some(name))?;
    Ok(layout.to_path_buf())
}

/// Writes a runwasi-style image layout into `layout` (created if missing; returned): `FROM
/// scratch`, `COPY app.wasm /`, `ENTRYPOINT ["/app.wasm"]`, i.e. one gzip layer holding
/// `app.wasm` (mode 0755) with `module`'s bytes, and no `Cmd` or `Env`.
pub fn wasm_in_scratch_layout(layout: &Path, name: &str, module: &[u8]) -> io::Result<PathBuf> {
    write_layout(
        layout,
        Some(name),
        &[Layer::gzip(vec![Entry::file("app.wasm", 0o755, module)])],
        &Config {
            env: Vec::new(),
            cmd: Vec::new(),
            entrypoint: vec!["/app.wasm".to_string()],
            working_dir: None,
            user: None,
        },
    )
}

/// Turns a one-image layout into a multi-platform one, as `docker buildx` or a registry's
/// manifest list would have it: index.json then points at an image index listing a
/// linux/arm64 manifest (a variant of the original, so with another digest) and the original
/// as linux/amd64. The ref-name annotation moves to the new index's descriptor.
pub fn nest_in_index(layout: &Path) -> io::Result<()> {
    let blobs = layout.join("blobs/sha256");
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(&index_path)?).map_err(io::Error::other)?;
    let mut amd64 = index["manifests"][0].take();
    let annotations = amd64["annotations"].take();
    if let Some(map) = amd64.as_object_mut() {
        map.remove("annotations");
    }
    amd64["platform"] = json!({ "architecture": "amd64", "os": "linux" });
    let digest = amd64["digest"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches("sha256:")
        .to_string();
    let mut other: serde_json::Value =
        serde_json::from_slice(&fs::read(blobs.join(digest))?).map_err(io::Error::other)?;
    other["annotations"] = json!({ "org.example.variant": "arm64" });
    let mut arm64 = write_blob(&blobs, crate::oci::OCI_MANIFEST, &to_vec(&other)?)?;
    arm64["platform"] = json!({ "architecture": "arm64", "os": "linux", "variant": "v8" });
    let nested = json!({
        "schemaVersion": 2,
        "mediaType": crate::oci::OCI_INDEX,
        "manifests": [arm64, amd64],
    });
    let mut descriptor = write_blob(&blobs, crate::oci::OCI_INDEX, &to_vec(&nested)?)?;
    if !annotations.is_null() {
        descriptor["annotations"] = annotations;
    }
    index["manifests"] = json!([descriptor]);
    fs::write(&index_path, to_vec(&index)?)
}

/// The hostile layers of the security tests. Each aims at `<dir>/sentinel/` (see
/// [`malicious_layout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malicious {
    /// A file named `../../../…/<dir>/sentinel/pwned`.
    DotDot,
    /// A file named `/<dir>/sentinel/pwned`.
    Absolute,
    /// `etc -> <dir>/sentinel` (a symlink), then a file `etc/pwned`.
    SymlinkParent,
    /// A hard link whose target is `../../../…/<dir>/sentinel/victim`.
    HardlinkOutside,
    /// A hard link whose target is `/<dir>/sentinel/victim`.
    HardlinkAbsolute,
    /// `s -> <dir>/sentinel`, then a hard link whose target is `s/victim`.
    HardlinkThroughSymlink,
}

impl Malicious {
    pub const ALL: [Malicious; 6] = [
        Malicious::DotDot,
        Malicious::Absolute,
        Malicious::SymlinkParent,
        Malicious::HardlinkOutside,
        Malicious::HardlinkAbsolute,
        Malicious::HardlinkThroughSymlink,
    ];
}

/// The directory a malicious layout tries to write into: `<dir>/sentinel`, holding one file
/// `victim` ("untouched\n").
pub fn sentinel_dir(dir: &Path) -> PathBuf {
    dir.join("sentinel")
}

/// Builds `<dir>/malicious-<kind>.oci`, named `malicious:latest`, whose single layer tries to
/// escape towards `<dir>/sentinel/` (created here, with its `victim` file).
pub fn malicious_layout(dir: &Path, kind: Malicious) -> io::Result<PathBuf> {
    let sentinel = sentinel_dir(dir);
    fs::create_dir_all(&sentinel)?;
    fs::write(sentinel.join("victim"), b"untouched\n")?;
    let abs = fs::canonicalize(&sentinel)?.to_string_lossy().into_owned();
    let up = "../".repeat(40);
    let rel = abs.trim_start_matches('/');
    let entries = match kind {
        Malicious::DotDot => vec![Entry::file(&format!("{up}{rel}/pwned"), 0o644, b"pwned\n")],
        Malicious::Absolute => vec![Entry::file(&format!("{abs}/pwned"), 0o644, b"pwned\n")],
        Malicious::SymlinkParent => vec![
            Entry::symlink("etc", &abs),
            Entry::file("etc/pwned", 0o644, b"pwned\n"),
        ],
        Malicious::HardlinkOutside => {
            vec![Entry::hardlink("victim-link", &format!("{up}{rel}/victim"))]
        }
        Malicious::HardlinkAbsolute => {
            vec![Entry::hardlink("victim-link", &format!("{abs}/victim"))]
        }
        Malicious::HardlinkThroughSymlink => vec![
            Entry::symlink("s", &abs),
            Entry::hardlink("victim-link", "s/victim"),
        ],
    };
    let entries = [vec![Entry::file("ok", 0o644, b"fine\n")], entries].concat();
    let layout = dir.join(format!("malicious-{kind:?}.oci").to_lowercase());
    write_layout(
        &layout,
        Some("malicious"),
        &[Layer::gzip(entries)],
        &Config::default(),
    )
}

/// Writes `<layout>.tar` (next to the layout directory), a tar of the layout, and returns its
/// path.
pub fn tar_layout(layout: &Path) -> io::Result<PathBuf> {
    let path = sibling(layout, ".tar");
    let bytes = layout_tar_bytes(layout)?;
    fs::write(&path, bytes)?;
    Ok(path)
}

/// Writes `<layout>.tar.gz` (next to the layout directory), a gzipped tar of the layout, and
/// returns its path.
pub fn tar_gz_layout(layout: &Path) -> io::Result<PathBuf> {
    let path = sibling(layout, ".tar.gz");
    let bytes = gzip(&layout_tar_bytes(layout)?)?;
    fs::write(&path, bytes)?;
    Ok(path)
}

fn layout_tar_bytes(layout: &Path) -> io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.mode(tar::HeaderMode::Deterministic);
    builder.append_path_with_name(layout.join("oci-layout"), "oci-layout")?;
    builder.append_path_with_name(layout.join("index.json"), "index.json")?;
    let mut blobs: Vec<_> = fs::read_dir(layout.join("blobs/sha256"))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    blobs.sort();
    for blob in blobs {
        let name = Path::new("blobs/sha256").join(&blob);
        builder.append_path_with_name(layout.join(&name), &name)?;
    }
    builder.into_inner()
}

/// A tar of `entries`, names and link targets written as given (`..` and absolute ones
/// included, as a hostile image or sandbox would send them; GNU long-name records past 100
/// bytes).
pub fn layer_tar(entries: &[Entry]) -> io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        match entry {
            Entry::Dir { path, mode } => append_raw(
                &mut builder,
                path,
                tar::EntryType::Directory,
                *mode,
                &[],
                "",
            )?,
            Entry::File { path, mode, data } => {
                append_raw(&mut builder, path, tar::EntryType::Regular, *mode, data, "")?
            }
            Entry::Symlink { path, target } => append_raw(
                &mut builder,
                path,
                tar::EntryType::Symlink,
                0o777,
                &[],
                target,
            )?,
            Entry::Hardlink { path, target } => {
                append_raw(&mut builder, path, tar::EntryType::Link, 0o644, &[], target)?
            }
            Entry::CharDevice { path, major, minor } => {
                let mut header = raw_header(path.as_bytes(), tar::EntryType::Char, 0o666, 0, b"");
                header.set_device_major(*major)?;
                header.set_device_minor(*minor)?;
                header.set_cksum();
                long_names(&mut builder, path, "")?;
                builder.append(&header, io::empty())?;
            }
        }
    }
    builder.into_inner()
}

fn append_raw(
    builder: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    data: &[u8],
    link: &str,
) -> io::Result<()> {
    long_names(builder, path, link)?;
    let header = raw_header(
        path.as_bytes(),
        kind,
        mode,
        data.len() as u64,
        link.as_bytes(),
    );
    builder.append(&header, data)
}

fn long_names(builder: &mut tar::Builder<Vec<u8>>, path: &str, link: &str) -> io::Result<()> {
    for (value, kind) in [
        (path, tar::EntryType::GNULongName),
        (link, tar::EntryType::GNULongLink),
    ] {
        if value.len() > 100 {
            let mut data = value.as_bytes().to_vec();
            data.push(0);
            let header = raw_header(b"././@LongLink", kind, 0o644, data.len() as u64, b"");
            builder.append(&header, data.as_slice())?;
        }
    }
    Ok(())
}

fn raw_header(path: &[u8], kind: tar::EntryType, mode: u32, size: u64, link: &[u8]) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    {
        let old = header.as_old_mut();
        let n = path.len().min(old.name.len());
        old.name[..n].copy_from_slice(&path[..n]);
        let n = link.len().min(old.linkname.len());
        old.linkname[..n].copy_from_slice(&link[..n]);
    }
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(MTIME);
    header.set_size(size);
    header.set_cksum();
    header
}

fn gzip(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data)?;
    encoder.finish()
}

fn hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

fn to_vec(value: &serde_json::Value) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(io::Error::other)
}

fn write_blob(blobs: &Path, media_type: &str, data: &[u8]) -> io::Result<serde_json::Value> {
    let hex = hex(data);
    fs::write(blobs.join(&hex), data)?;
    Ok(json!({ "mediaType": media_type, "digest": format!("sha256:{hex}"), "size": data.len() }))
}

fn sibling(layout: &Path, suffix: &str) -> PathBuf {
    let mut name = layout.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    layout.with_file_name(name)
}

/// A real OCI registry for pull tests: Debian's `docker-registry` serving plain http on a
/// free loopback port, its storage in `dir`. Killed on drop, pass or fail.
#[derive(Debug)]
pub struct Registry {
    child: std::process::Child,
    pub port: u16,
    dir: PathBuf,
}

/// The registry binary [`Registry::start`] runs.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

impl Registry {
    /// Why a registry test cannot run here ("docker-registry not installed"), if it cannot.
    pub fn missing_tool() -> Option<&'static str> {
        if !Path::new(REGISTRY_BIN).exists() {
            return Some("docker-registry");
        }
        let skopeo = std::process::Command::new("skopeo")
            .arg("--version")
            .output();
        if !skopeo.is_ok_and(|o| o.status.success()) {
            return Some("skopeo");
        }
        None
    }

    /// Starts a registry storing into `dir` (created) and waits until it listens.
    ///
    /// A port picked free can be taken by someone else before the registry binds it: the
    /// registry then exits, and another port is tried (five in all).
    pub fn start(dir: &Path) -> io::Result<Registry> {
        fs::create_dir_all(dir)?;
        let mut last = None;
        for _ in 0..5 {
            match Self::start_on_a_free_port(dir)? {
                Ok(registry) => return Ok(registry),
                Err(exited) => last = Some(exited),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("registry did not start")))
    }

    /// `Ok(Err(_))` when the registry exited before it listened (its port was taken, say).
    fn start_on_a_free_port(dir: &Path) -> io::Result<io::Result<Registry>> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let config = dir.join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                dir.join("data").display()
            ),
        )?;
        let log = fs::File::create(dir.join("registry.log"))?;
        let child = std::process::Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut registry = Registry {
            child,
            port,
            dir: dir.to_path_buf(),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            // A registry that exited (its port taken) is retried on another port; a
            // listener that is not a registry never passes for it.
            if let Some(status) = registry.child.try_wait()? {
                return Ok(Err(io::Error::other(format!(
                    "registry on port {port} exited ({status}): {}",
                    registry.log()
                ))));
            }
            if answers_as_a_registry(port) {
                return Ok(Ok(registry));
            }
            if std::time::Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "registry did not listen on {port}: {}",
                    registry.log()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }

    /// Pushes an OCI layout as `repo_tag` with skopeo (`all`: every platform of an index).
    pub fn push(&self, layout: &Path, repo_tag: &str, all: bool) -> io::Result<()> {
        let mut command = std::process::Command::new("skopeo");
        command.args(["--insecure-policy", "copy", "--dest-tls-verify=false"]);
        if all {
            command.arg("--all");
        }
        let output = command
            .arg(format!("oci:{}", layout.display()))
            .arg(format!("docker://127.0.0.1:{}/{repo_tag}", self.port))
            .output()?;
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "skopeo copy failed: {}\n{}",
                String::from_utf8_lossy(&output.stderr),
                self.log()
            )));
        }
        Ok(())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether what listens on 127.0.0.1:`port` answers `GET /v2/` as a distribution registry
/// does (with its `Docker-Distribution-Api-Version` header).
fn answers_as_a_registry(port: u16) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    if conn
        .write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = Vec::new();
    let _ = conn.take(64 * 1024).read_to_end(&mut reply);
    String::from_utf8_lossy(&reply)
        .to_ascii_lowercase()
        .contains("docker-distribution-api-version")
}
