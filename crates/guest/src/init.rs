//! PID 1's start: the file systems every Linux userland expects, the kernel modules the
//! VM's devices need (Debian's kernel has virtio as modules; warren's minimal one has none),
//! and the cgroup for workloads.

use std::path::Path;

use nix::mount::{MsFlags, mount};

/// The module list the initramfs carries: one file name per line, in load order, relative
/// to its directory (written by `scripts/vm-assets.sh`).
const MODULE_ORDER: &str = "/lib/modules/warren/order";

/// Mounts /proc, /sys, /dev (+ pts, shm), /run, /tmp and the cgroup2 hierarchy; loads the
/// modules. Problems are reported on the console and the guest goes on: the host sees what
/// does not work through the task API's errors.
pub fn early() {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mounts: [(&str, &str, MsFlags, Option<&str>); 8] = [
        ("proc", "/proc", nosuid, None),
        ("sysfs", "/sys", nosuid, None),
        ("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755")),
        (
            "devpts",
            "/dev/pts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None,
        ),
        (
            "tmpfs",
            "/run",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None,
        ),
        (
            "tmpfs",
            "/tmp",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None,
        ),
        ("cgroup2", warren_guest::CGROUP_ROOT, nosuid, None),
    ];
    for (fstype, target, flags, data) in mounts {
        if let Err(e) = std::fs::create_dir_all(target) {
            eprintln!("warren-guest: mkdir {target}: {e}");
            continue;
        }
        if let Err(e) = mount(Some(fstype), target, Some(fstype), flags, data) {
            eprintln!("warren-guest: mount {fstype} on {target}: {e}");
        }
    }
    // /dev/ptmx must be the new devpts instance's.
    let _ = std::fs::remove_file("/dev/ptmx");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    let _ = std::fs::create_dir_all("/run/warren");
    load_modules(Path::new(MODULE_ORDER));
    // The workload's cgroup: its controllers must be enabled in the root first.
    let root = Path::new(warren_guest::CGROUP_ROOT);
    if let Err(e) = std::fs::write(root.join("cgroup.subtree_control"), "+memory +pids +cpu") {
        eprintln!("warren-guest: enable cgroup controllers: {e}");
    }
    if let Err(e) = std::fs::create_dir_all(root.join(warren_guest::WORKLOAD_CGROUP)) {
        eprintln!("warren-guest: create the workload cgroup: {e}");
    }
    let _ = nix::unistd::sethostname("warren");
}

fn load_modules(order: &Path) {
    let Ok(list) = std::fs::read_to_string(order) else {
        return;
    };
    let dir = order.parent().unwrap_or(Path::new("/"));
    for name in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Err(e) = crate::sys::load_module(&dir.join(name)) {
            eprintln!("warren-guest: load module {name}: {e}");
        }
    }
}
