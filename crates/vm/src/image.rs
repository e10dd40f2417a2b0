//! A sandbox's image as a disk: the image's layers merged into one read-only ext4 file,
//! made once per image and shared by every VM that runs it (seed 002's `image_path`, per
//! image). The guest mounts it under a writable overlay of its own.

use std::path::{Path, PathBuf};
use std::process::Command;

use warren_image::{Image, ImageStore};
use warren_runtime::BackendError;

/// Where the vm backend whose directory is `vm_dir` keeps its image disks.
pub fn disk_cache(vm_dir: &Path) -> PathBuf {
    vm_dir.join(crate::backend::IMAGES_DIR)
}

/// The disk of image `name`, making it if needed; the image's config with it.
pub fn root_disk(
    images: &ImageStore,
    cache: &Path,
    name: &str,
) -> Result<(PathBuf, Image), BackendError> {
    let image = images.resolve(name).map_err(|e| {
        BackendError::Invalid(format!(
            "spec.image: {name:?}: {}",
            warren_runtime::error_chain(&e)
        ))
    })?;
    let disk = cache.join(disk_name(&image.id));
    if disk.is_file() {
        return Ok((disk, image));
    }
    std::fs::create_dir_all(cache).map_err(|e| BackendError::io("create", cache, e))?;
    let work = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(cache)
        .map_err(|e| BackendError::io("create a directory in", cache, e))?;
    let merged = work.path().join("merged");
    std::fs::create_dir(&merged).map_err(|e| BackendError::io("create", &merged, e))?;
    // Several layers: an overlay mount merges them (whiteouts included) for mkfs to read.
    let source = match image.layers.as_slice() {
        [] => merged.clone(),
        [one] => one.clone(),
        layers => {
            merge_layers(layers, &merged)
                .map_err(|e| BackendError::Other(format!("merge the layers of {name}: {e}")))?;
            merged.clone()
        }
    };
    let bytes = tree_size(&source);
    // Room for ext4's own structures and inodes, rounded to MiB.
    let size_mb = (bytes * 13 / 10) / (1 << 20) + 16;
    let tmp = work.path().join("disk.ext4");
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            "warren-root",
            "-O",
            "^has_journal",
            "-E",
            "root_owner=0:0",
            "-d",
        ])
        .arg(&source)
        .arg(&tmp)
        .arg(format!("{size_mb}M"))
        .output();
    if source == merged && image.layers.len() > 1 {
        let _ = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH);
    }
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Err(BackendError::Other(format!(
                "mkfs.ext4 for image {name}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )));
        }
        Err(e) => return Err(BackendError::io("run mkfs.ext4 (e2fsprogs) for", &tmp, e)),
    }
    std::fs::rename(&tmp, &disk).map_err(|e| BackendError::io("move into place", &disk, e))?;
    Ok((disk, image))
}

/// Mounts `layers` (bottom first, two at least) read-only on `merged` as one overlay: each
/// layer its own `lowerdir+` where the kernel has it (Linux 6.8+: any number of layers), else
/// the one-string mount, whose one page of options ~40 layer paths fill.
fn merge_layers(layers: &[PathBuf], merged: &Path) -> Result<(), String> {
    let lower: Vec<&Path> = layers.iter().rev().map(PathBuf::as_path).collect();
    match warren_linux::container::mount_overlay_per_layer(merged, &lower, None) {
        Ok(true) => return Ok(()),
        Ok(false) => {}
        Err(e) => return Err(e.desc().to_string()),
    }
    let lower: Vec<String> = lower.iter().map(|l| l.display().to_string()).collect();
    let options = format!("lowerdir={}", lower.join(":"));
    nix::mount::mount(
        Some("overlay"),
        merged,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(options.as_str()),
    )
    .map_err(|e| {
        let hint = warren_linux::container::overlay_options_hint(layers.len(), options.len());
        format!("{}{hint}", e.desc())
    })
}

/// The file name of the disk of the image `id` in the cache.
fn disk_name(id: &str) -> String {
    let key: String = id.trim_start_matches("sha256:").chars().take(24).collect();
    format!("{key}.ext4")
}

/// The disks in `cache` of images the store no longer has (removed since). The cache is
/// read before the store: a disk made meanwhile for a new image is not taken for an orphan.
pub(crate) fn orphan_disks(
    images: &ImageStore,
    cache: &Path,
) -> Result<Vec<PathBuf>, BackendError> {
    let disks: Vec<(String, PathBuf)> = std::fs::read_dir(cache)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .filter(|(name, _)| name.ends_with(".ext4") && !name.starts_with('.'))
        .collect();
    if disks.is_empty() {
        return Ok(Vec::new());
    }
    let kept: std::collections::HashSet<String> = images
        .list()
        .map_err(|e| BackendError::Other(warren_runtime::error_chain(&e)))?
        .iter()
        .map(|i| disk_name(&i.id))
        .collect();
    Ok(disks
        .into_iter()
        .filter(|(name, _)| !kept.contains(name))
        .map(|(_, path)| path)
        .collect())
}

/// The disks in `cache` that images with a name would have (made or not): a disk outside
/// this set is of an image only its id still reaches (imported again under its name) or gone.
pub(crate) fn named_disks(
    images: &ImageStore,
    cache: &Path,
) -> Result<std::collections::HashSet<PathBuf>, BackendError> {
    Ok(images
        .list()
        .map_err(|e| BackendError::Other(warren_runtime::error_chain(&e)))?
        .iter()
        .filter(|i| !i.names.is_empty())
        .map(|i| cache.join(disk_name(&i.id)))
        .collect())
}

/// Bytes of the regular files under `dir` (symlinks not followed).
fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => dirs.push(entry.path()),
                Ok(t) if t.is_file() => total += entry.metadata().map(|m| m.len()).unwrap_or(0),
                _ => total += 64,
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_image::testing::{Config, Entry, Layer, write_layout};

    /// Whether the running kernel is at least `major.minor`.
    fn kernel_at_least(major: u32, minor: u32) -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut parts = release
            .trim()
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
    }

    /// The files of `dir` on the ext4 `disk`, read with debugfs (no mount).
    fn disk_ls(disk: &Path, dir: &str) -> Vec<String> {
        let out = Command::new("debugfs")
            .args(["-R", &format!("ls -p {dir}")])
            .arg(disk)
            .output()
            .expect("run debugfs");
        assert!(out.status.success(), "{out:?}");
        // `/inode/mode/uid/gid/name/size/` lines.
        let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split('/').nth(5).map(str::to_string))
            .filter(|n| !n.is_empty() && n != "." && n != "..")
            .collect();
        names.sort();
        names
    }

    /// An image of more layers than one page of mount options can list becomes one disk:
    /// every layer's file in it, a whiteout honoured, the uppermost copy of a file winning.
    #[test]
    fn an_image_of_many_layers_merges_into_one_disk() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIP an_image_of_many_layers_merges_into_one_disk: needs root to mount");
            return;
        }
        if !kernel_at_least(6, 8) {
            eprintln!(
                "SKIP an_image_of_many_layers_merges_into_one_disk: Linux before 6.8 has no \
                 overlay lowerdir+"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let layers: Vec<Layer> = (0..80)
            .map(|i| {
                let mut entries = vec![
                    Entry::dir("layers", 0o755),
                    Entry::file(&format!("layers/{i:02}"), 0o644, b"x"),
                    Entry::file("layers/top", 0o644, format!("{i}\n").as_bytes()),
                ];
                if i == 50 {
                    entries.push(Entry::file("layers/.wh.07", 0o644, b""));
                }
                Layer::gzip(entries)
            })
            .collect();
        let layout = write_layout(
            &dir.path().join("layout"),
            Some("tall"),
            &layers,
            &Config::default(),
        )
        .unwrap();
        let store = ImageStore::open(&dir.path().join("store")).unwrap();
        store.import(&layout, None).unwrap();
        let cache = dir.path().join("cache");
        let (disk, image) = root_disk(&store, &cache, "tall").unwrap();
        assert_eq!(image.layers.len(), 80);
        let lower_bytes: usize = image.layers.iter().map(|l| l.as_os_str().len() + 1).sum();
        assert!(
            lower_bytes > 4096,
            "the layers' paths fit one page: {lower_bytes} bytes"
        );

        let mut want: Vec<String> = (0..80)
            .filter(|i| *i != 7)
            .map(|i| format!("{i:02}"))
            .collect();
        want.push("top".to_string());
        assert_eq!(disk_ls(&disk, "/layers"), want);
        let top = Command::new("debugfs")
            .args(["-R", "cat /layers/top"])
            .arg(&disk)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&top.stdout), "79\n");
        // The build's directory, and the overlay on it, are gone: the disk alone is left.
        let left: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [disk.file_name().unwrap().to_owned()]);
    }
}
