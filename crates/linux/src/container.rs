//! The container's own side: what the forked child does between `fork` and `execve`.
//!
//! The supervisor is single-threaded, so the child may allocate and use the standard library
//! freely (the usual post-fork restrictions come from other threads holding locks). It runs,
//! in order:
//!
//! 1. starts a session of its own (so the tree can be checkpointed: [`crate::criu`]) and
//!    joins the sandbox's cgroup (writing `0` to `cgroup.procs` moves the writer), so every
//!    byte and process the workload makes is counted from the start;
//! 2. unshares the mount, UTS, IPC, network and cgroup namespaces (the pid namespace was
//!    unshared by the supervisor before the fork, so this process is pid 1 in it);
//! 3. makes every mount private, mounts the overlay (image layers below, the sandbox's
//!    `upper`/`work` above) on the bundle's `rootfs`, and `pivot_root`s into it, detaching the
//!    old root: from here on no path can name a host file, and symlinks in the image resolve
//!    inside the rootfs. The overlay exists only in this mount namespace, so it disappears
//!    with the last process and nothing is left mounted on the host;
//! 4. mounts `/proc` (this pid namespace's), a read-only `/sys`, a minimal `/dev` (tmpfs with
//!    null, zero, full, random, urandom, tty, a private devpts and `/dev/shm`), the user's bind
//!    mounts (host directories opened before the pivot and mounted through `/proc/self/fd`),
//!    masks kernel files as docker does and makes `/proc/sys` and friends read-only;
//! 5. sets the hostname, brings up `lo`; applies the policy's paths (each `writable` path a
//!    mount of its own, `readOnly` paths remounted read-only, `masked` paths hidden) and
//!    remounts `/` read-only when asked or when the policy lists writable paths;
//! 6. drops the capability bounding set to docker's default set, switches to the user's
//!    uid/gid (the other capability sets reduced to the default in between), changes
//!    directory, installs the exec gate when the policy has an exec list
//!    ([`crate::execgate`]) and the seccomp filter (which sets `no_new_privs`), and
//!    `execve`s the workload.
//!
//! A warm shell ([`warm_child_main`]) runs 1–4 ahead of time, then also drops the bounding
//! set and compiles the default seccomp profile, before it reports ready; at its claim only
//! 5, the rest of 6 and a filter other than the default are left.
//!
//! Any failure is written to the error pipe (close-on-exec, so a successful `execve` closes it
//! with nothing written) and the child exits 127: the supervisor turns that into a clear
//! error for the caller, such as `exec "nosuch": No such file or directory`.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::unistd::{Gid, Uid, chdir, pivot_root, sethostname, setresgid, setresuid};

use crate::config::ContainerConfig;

/// Where the host's root is parked during the pivot, relative to the new root: this name
/// and the sandbox's id, so sandboxes sharing one root directory (a prepared root used in
/// place) do not take each other's.
const OLD_ROOT: &str = ".warren-old-root";

fn old_root_name(id: &str) -> String {
    let id: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .take(64)
        .collect();
    format!("{OLD_ROOT}-{id}")
}

/// Capabilities a workload keeps: docker's default set without `CAP_MKNOD`. Docker keeps
/// that one behind a device cgroup allow-list; warren sets no device rules (cgroup v2 has
/// them only as a BPF program), so a workload able to `mknod` could make and open any
/// device node of the host (`mknod /dev/sda b 8 0`) wherever it can write a file on a
/// mount without `nodev` (its own `/dev`). The nodes it needs are made before it starts.
pub const DEFAULT_CAPS: &[caps::Capability] = &[
    caps::Capability::CAP_CHOWN,
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_FSETID,
    caps::Capability::CAP_FOWNER,
    caps::Capability::CAP_NET_RAW,
    caps::Capability::CAP_SETGID,
    caps::Capability::CAP_SETUID,
    caps::Capability::CAP_SETFCAP,
    caps::Capability::CAP_SETPCAP,
    caps::Capability::CAP_NET_BIND_SERVICE,
    caps::Capability::CAP_SYS_CHROOT,
    caps::Capability::CAP_KILL,
    caps::Capability::CAP_AUDIT_WRITE,
];

/// Kernel files hidden from the workload (docker's list).
const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Kernel files the workload may read but not write (docker's list).
const READ_ONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Device nodes in the container's `/dev`: name, major, minor.
const DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// What the child needs, prepared by the supervisor before the fork.
#[derive(Debug)]
pub struct ChildPlan<'a> {
    pub config: &'a ContainerConfig,
    pub bundle: &'a Path,
    pub cgroup_procs: Vec<PathBuf>,
    pub seccomp: &'a seccompiler::BpfProgram,
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// Where the exec gate's listener goes, when the policy has an exec list.
    pub gate: Option<OwnedFd>,
    /// With `network.mode: egress`: the child writes a byte on the first once its network
    /// namespace exists and waits for one on the second, while the supervisor gives the
    /// namespace its veth pair ([`crate::egress`]).
    pub network: Option<(OwnedFd, OwnedFd)>,
}

/// Runs in the forked child; returns only with an error (else it has become the workload).
pub fn child_main(plan: ChildPlan<'_>) -> String {
    let result = prepare(plan.config, plan.bundle, &plan.cgroup_procs).and_then(|()| {
        if let Some((ready, go)) = plan.network {
            wait_for_network(ready, go)?;
        }
        drop_bounding_set()?;
        finish(
            plan.config,
            plan.seccomp,
            [plan.stdin, plan.stdout, plan.stderr],
            plan.gate.as_ref(),
        )
    });
    match result {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// The warm variant: prepares everything an image needs (namespaces, rootfs, `/proc`,
/// `/dev`, masks), writes one byte to `ready`, then waits for the claimed sandbox's
/// configuration on `claim` (JSON, until end of file) and finishes with it. A warm shell
/// has no bind mounts: sandboxes that need some start cold. `gate` is used only when the
/// claimed sandbox's policy has an exec list.
pub fn warm_child_main(
    template: &ContainerConfig,
    bundle: &Path,
    cgroup_procs: &[PathBuf],
    ready: OwnedFd,
    claim: OwnedFd,
    stdio: [OwnedFd; 3],
    gate: OwnedFd,
) -> String {
    let result = prepare(template, bundle, cgroup_procs).and_then(|()| {
        // What no claim changes is done before the shell is ready: the bounding set (every
        // sandbox gets the default set) and the default seccomp profile, compiled into this
        // process's cache, where a claim with that profile finds it.
        drop_bounding_set()?;
        crate::seccomp::compiled_with(&template.deny_syscalls, template.policy_syscalls.as_ref())
            .map_err(|e| crate::error_chain(&e))?;
        nix::unistd::write(&ready, b"r").map_err(|e| err("report ready", e))?;
        drop(ready);
        let mut file = std::fs::File::from(claim);
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut bytes).map_err(|e| err("read the claim", e))?;
        let config: ContainerConfig =
            serde_json::from_slice(&bytes).map_err(|e| err("parse the claim", e))?;
        let seccomp =
            crate::seccomp::compiled_with(&config.deny_syscalls, config.policy_syscalls.as_ref())
                .map_err(|e| crate::error_chain(&e))?;
        finish(&config, &seccomp, stdio, Some(&gate))
    });
    match result {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// Tells the supervisor the network namespace exists and waits until it is set up.
fn wait_for_network(ready: OwnedFd, go: OwnedFd) -> Result<(), String> {
    nix::unistd::write(&ready, b"n").map_err(|e| err("report the network namespace", e))?;
    drop(ready);
    match read_byte(&go) {
        Ok(1) => Ok(()),
        // The supervisor reports its own error; this one is only seen if it died.
        _ => Err("the sandbox's network was not set up".to_string()),
    }
}

/// Reads one byte of a pipe (0: its end), retrying when a signal interrupts.
pub(crate) fn read_byte(fd: &OwnedFd) -> nix::Result<usize> {
    let mut byte = [0u8; 1];
    loop {
        match nix::unistd::read(fd, &mut byte) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => return other,
        }
    }
}

fn err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

/// Everything up to the workload's own settings: cgroup, namespaces, the rootfs and what is
/// mounted in it.
fn prepare(cfg: &ContainerConfig, bundle: &Path, cgroup_procs: &[PathBuf]) -> Result<(), String> {
    reset_signals();
    // The container's init leads a session of its own, as runc's does: a session led from
    // outside its pid namespace (the supervisor's) is a tree CRIU cannot checkpoint.
    nix::unistd::setsid().map_err(|e| err("setsid", e))?;
    for procs in cgroup_procs {
        std::fs::write(procs, "0")
            .map_err(|e| err(format!("join cgroup {}", procs.display()), e))?;
    }
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .map_err(|e| err("unshare namespaces", e))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| err("make mounts private", e))?;

    let rootfs = bundle.join(crate::config::ROOTFS_DIR);
    if cfg.storage_bytes.is_some() {
        mount_storage(bundle)?;
    }
    mount_overlay(cfg, bundle, &rootfs)?;
    // Host directories for bind mounts, opened while the host's tree is still visible.
    let mut host_dirs = Vec::with_capacity(cfg.mounts.len());
    for m in &cfg.mounts {
        host_dirs.push(open_mount_source(&m.host)?);
    }

    chdir(&rootfs).map_err(|e| err(format!("chdir {}", rootfs.display()), e))?;
    let mut parked = old_root_name(&cfg.id);
    // The old root stays reachable under `parked` until the bind mounts are made (a bind
    // mount's source must be attached to this namespace's tree), then it is detached.
    match std::fs::create_dir(&parked) {
        Ok(()) => {}
        // A root on a read-only file system: a directory it has for the purpose.
        Err(e)
            if e.raw_os_error() == Some(libc::EROFS)
                && std::fs::symlink_metadata(OLD_ROOT).is_ok_and(|m| m.is_dir()) =>
        {
            parked = OLD_ROOT.to_string();
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(&parked).map_err(|e| err(&parked, e))?;
            if !meta.is_dir() {
                return Err(format!("the image has a {parked} that is not a directory"));
            }
        }
        Err(e) => return Err(err(format!("mkdir {parked}"), e)),
    }
    pivot_root(".", parked.as_str()).map_err(|e| err("pivot_root", e))?;
    chdir("/").map_err(|e| err("chdir /", e))?;

    mount_kernel_filesystems()?;
    for (m, fd) in cfg.mounts.iter().zip(&host_dirs) {
        let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
        mkdir_all(&m.guest)?;
        mount(
            Some(source.as_str()),
            m.guest.as_str(),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| err(format!("bind {} on {}", m.host.display(), m.guest), e))?;
        if m.read_only {
            remount_read_only(&m.guest)?;
        }
    }
    drop(host_dirs);
    let old_root = format!("/{parked}");
    umount2(old_root.as_str(), MntFlags::MNT_DETACH).map_err(|e| err("detach the old root", e))?;
    if parked != OLD_ROOT {
        std::fs::remove_dir(&old_root).map_err(|e| err(format!("rmdir {old_root}"), e))?;
    }
    mask_paths()?;
    set_loopback(true).map_err(|e| err("bring up lo", e))?;
    Ok(())
}

/// The workload's own settings, then `execve`.
fn finish(
    cfg: &ContainerConfig,
    seccomp: &seccompiler::BpfProgram,
    stdio: [OwnedFd; 3],
    gate: Option<&OwnedFd>,
) -> Result<std::convert::Infallible, String> {
    sethostname(&cfg.hostname).map_err(|e| err(format!("sethostname {}", cfg.hostname), e))?;
    // The policy's part is applied here, not in `prepare`, which a warm shell runs before it
    // knows its sandbox.
    if !cfg.loopback {
        set_loopback(false).map_err(|e| err("take down lo (policy network.mode none)", e))?;
    }
    // Writable paths become mounts of their own first, so the read-only remounts below
    // (a `readOnly` path above one, the root) leave them writable.
    // `writable: [/]` leaves everything as it is.
    let root_writable = cfg
        .writable_paths
        .iter()
        .any(|p| p.trim_matches('/').is_empty());
    for path in cfg.writable_paths.iter().filter(|_| !root_writable) {
        writable_path(path)?;
    }
    for path in &cfg.read_only_paths {
        read_only_path(path)?;
    }
    for path in &cfg.masked_paths {
        mask_path(path)?;
    }
    if cfg.read_only_rootfs || (!cfg.writable_paths.is_empty() && !root_writable) {
        remount_read_only("/")?;
    }

    let gid = Gid::from_raw(cfg.gid);
    let uid = Uid::from_raw(cfg.uid);
    nix::unistd::setgroups(&[gid]).map_err(|e| err("setgroups", e))?;
    setresgid(gid, gid, gid).map_err(|e| err(format!("setgid {}", cfg.gid), e))?;
    restrict_capabilities()?;
    setresuid(uid, uid, uid).map_err(|e| err(format!("setuid {}", cfg.uid), e))?;
    chdir(cfg.cwd.as_str()).map_err(|e| err(format!("chdir {} (working dir)", cfg.cwd), e))?;

    let program = find_program(&cfg.argv, &cfg.env)?;
    let argv = to_cstrings("argv", &cfg.argv)?;
    let env = to_cstrings("env", &cfg.env)?;

    // stdio last: errors before this point could still be logged by the supervisor.
    let [stdin, stdout, stderr] = stdio;
    nix::unistd::dup2_stdin(&stdin).map_err(|e| err("dup2 stdin", e))?;
    nix::unistd::dup2_stdout(&stdout).map_err(|e| err("dup2 stdout", e))?;
    nix::unistd::dup2_stderr(&stderr).map_err(|e| err("dup2 stderr", e))?;
    drop((stdin, stdout, stderr));
    close_other_fds();

    // The gate first: the sandbox's own filter may not allow `seccomp` or `sendmsg`.
    if cfg.exec_allow.is_some() {
        let gate = gate.ok_or("policy exec.allow: no exec gate was prepared")?;
        crate::execgate::arm(std::os::fd::AsFd::as_fd(gate))?;
    }
    crate::seccomp::install(seccomp).map_err(|e| err("install seccomp filter", e))?;
    let e = nix::unistd::execve(&program, &argv, &env).unwrap_err();
    Err(format!("exec {:?}: {}", cfg.argv[0], e.desc()))
}

/// Mounts the writable layer's own file system (a storage limit) in this mount namespace,
/// with `upper` and `work` in it. util-linux's `mount` sets up the loop device, with
/// autoclear: it is released when the last mount of it goes, with this namespace.
fn mount_storage(bundle: &Path) -> Result<(), String> {
    let file = bundle.join(crate::config::STORAGE_FILE);
    let dir = bundle.join(crate::config::STORAGE_DIR);
    let out = std::process::Command::new("mount")
        .args(["-t", "ext4", "-o", "loop,nodev,nosuid"])
        .arg(&file)
        .arg(&dir)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| err("run mount (util-linux) for the storage limit", e))?;
    if !out.status.success() {
        return Err(format!(
            "mount {} on {}: {}",
            file.display(),
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    for d in [crate::config::UPPER_DIR, crate::config::WORK_DIR] {
        std::fs::create_dir(dir.join(d))
            .map_err(|e| err(format!("create {d} in {}", dir.display()), e))?;
    }
    Ok(())
}

/// Opens `path`, a host directory to mount (resolved when the sandbox was created), as an
/// `O_PATH` descriptor to mount through `/proc/self/fd`, and refuses it if it now leads
/// elsewhere: a directory swapped for a symlink since would otherwise mount what the symlink
/// names, outside what the policy's `hostPaths` allowed.
fn open_mount_source(path: &Path) -> Result<OwnedFd, String> {
    let fd = nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| err(format!("open mount source {}", path.display()), e))?;
    let opened = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| err(format!("read what {} opened", path.display()), e))?;
    if opened != path {
        return Err(format!(
            "mount source {} now leads to {} (changed since the sandbox was created)",
            path.display(),
            opened.display()
        ));
    }
    Ok(fd)
}

pub(crate) fn mount_overlay(
    cfg: &ContainerConfig,
    bundle: &Path,
    rootfs: &Path,
) -> Result<(), String> {
    if let Some(dir) = &cfg.rootfs {
        // As runc does with a bundle's rootfs: the directory itself, recursively, in place.
        let fd = open_mount_source(dir)?;
        let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
        return mount(
            Some(source.as_str()),
            rootfs,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| err(format!("bind {} on {}", dir.display(), rootfs.display()), e));
    }
    if cfg.layers.is_empty() {
        return Err("the image has no layers".to_string());
    }
    for layer in &cfg.layers {
        let s = layer.as_os_str().as_bytes();
        if s.contains(&b':') || s.contains(&b',') {
            return Err(format!(
                "layer path {} holds ':' or ',', which overlayfs options cannot carry",
                layer.display()
            ));
        }
    }
    // With a storage limit the writable layer is on its own file system.
    let writable = match cfg.storage_bytes {
        Some(_) => bundle.join(crate::config::STORAGE_DIR),
        None => bundle.to_path_buf(),
    };
    let upper = writable.join(crate::config::UPPER_DIR);
    let work = writable.join(crate::config::WORK_DIR);
    // Top layer first, as overlayfs lists lower layers.
    let lower: Vec<&Path> = cfg.layers.iter().rev().map(PathBuf::as_path).collect();
    match mount_overlay_per_layer(rootfs, &lower, Some((&upper, &work))) {
        Ok(true) => return Ok(()),
        // No new mount API, or no `lowerdir+` (Linux before 6.8): the one-string mount.
        Ok(false) => {}
        Err(e) => {
            return Err(err(format!("mount overlay on {}", rootfs.display()), e));
        }
    }
    let lower: Vec<String> = lower.iter().map(|l| l.display().to_string()).collect();
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper.display(),
        work.display()
    );
    // `volatile` (Linux 5.10+): the upper layer is thrown away with the sandbox, so the
    // sync overlayfs does at unmount (a container's exit) buys nothing; older kernels
    // refuse the option, and get the plain mount.
    let volatile = format!("{data},volatile");
    mount(
        Some("overlay"),
        rootfs,
        Some("overlay"),
        MsFlags::MS_NODEV,
        Some(volatile.as_str()),
    )
    .or_else(|_| {
        mount(
            Some("overlay"),
            rootfs,
            Some("overlay"),
            MsFlags::MS_NODEV,
            Some(data.as_str()),
        )
    })
    .map_err(|e| {
        let hint = overlay_options_hint(lower.len(), data.len());
        err(format!("mount overlay on {}{hint}", rootfs.display()), e)
    })
}

/// What to add to the error of a one-string overlay mount of `layers` layers whose options
/// were `options_len` bytes: the options are one page at most, which ~40 layer paths fill.
pub fn overlay_options_hint(layers: usize, options_len: usize) -> String {
    if options_len >= 4096 {
        format!(
            " ({layers} layers take {options_len} bytes of mount options, more than the 4096 \
             this kernel takes; Linux 6.8+ mounts any number)"
        )
    } else {
        String::new()
    }
}

/// Mounts an overlay on `target` with the new mount API, each layer its own `lowerdir+`
/// (Linux 6.8+; `lower` top first), so an image may have as many layers as overlayfs stacks
/// (500): the one-string `mount(2)` options are one page, which ~40 layer paths fill.
/// `writable` is the (upper, work) pair; without one the mount is read-only, and needs two
/// layers at least. `Ok(false)`: this kernel cannot (no `fsopen`, or one a seccomp filter or
/// LSM refuses, or no `lowerdir+`), and the caller falls back to the one-string mount; any
/// later error is the mount's own.
pub fn mount_overlay_per_layer(
    target: &Path,
    lower: &[&Path],
    writable: Option<(&Path, &Path)>,
) -> Result<bool, nix::errno::Errno> {
    use rustix::mount::{
        FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, fsconfig_create,
        fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, move_mount,
    };
    let errno = |e: rustix::io::Errno| nix::errno::Errno::from_raw(e.raw_os_error());
    use rustix::io::Errno;
    let fs = match fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC) {
        Ok(fs) => fs,
        Err(Errno::NOSYS | Errno::PERM | Errno::ACCESS) => return Ok(false),
        Err(e) => return Err(errno(e)),
    };
    for (i, layer) in lower.iter().enumerate() {
        match fsconfig_set_string(&fs, "lowerdir+", *layer) {
            Ok(()) => {}
            // An unknown parameter: overlayfs before 6.8.
            Err(Errno::INVAL) if i == 0 => return Ok(false),
            Err(e) => return Err(errno(e)),
        }
    }
    let mut attrs = MountAttrFlags::MOUNT_ATTR_NODEV;
    match writable {
        Some((upper, work)) => {
            fsconfig_set_string(&fs, "upperdir", upper).map_err(errno)?;
            fsconfig_set_string(&fs, "workdir", work).map_err(errno)?;
            // See the legacy mount's `volatile`: kept where the kernel has it.
            let _ = fsconfig_set_flag(&fs, "volatile");
        }
        None => attrs |= MountAttrFlags::MOUNT_ATTR_RDONLY,
    }
    fsconfig_create(&fs).map_err(errno)?;
    let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs).map_err(errno)?;
    move_mount(
        &mnt,
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(errno)?;
    Ok(true)
}

fn mount_kernel_filesystems() -> Result<(), String> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mkdir_all("/proc")?;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        nosuid_nodev_noexec,
        None::<&str>,
    )
    .map_err(|e| err("mount /proc", e))?;
    mkdir_all("/sys")?;
    mount(
        Some("sysfs"),
        "/sys",
        Some("sysfs"),
        nosuid_nodev_noexec | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|e| err("mount /sys", e))?;
    mkdir_all("/dev")?;
    mount(
        Some("tmpfs"),
        "/dev",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )
    .map_err(|e| err("mount /dev", e))?;
    for (name, major, minor) in DEVICES {
        let path = format!("/dev/{name}");
        mknod(
            path.as_str(),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(*major, *minor),
        )
        .map_err(|e| err(format!("mknod {path}"), e))?;
        // mknod honours the umask; the nodes must be usable by any uid.
        nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            path.as_str(),
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(|e| err(format!("chmod {path}"), e))?;
    }
    for dir in ["/dev/pts", "/dev/shm", "/dev/mqueue"] {
        mkdir_all(dir)?;
    }
    mount(
        Some("devpts"),
        "/dev/pts",
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(|e| err("mount /dev/pts", e))?;
    mount(
        Some("shm"),
        "/dev/shm",
        Some("tmpfs"),
        nosuid_nodev_noexec,
        Some("mode=1777,size=65536k"),
    )
    .map_err(|e| err("mount /dev/shm", e))?;
    mount(
        Some("mqueue"),
        "/dev/mqueue",
        Some("mqueue"),
        nosuid_nodev_noexec,
        None::<&str>,
    )
    .map_err(|e| err("mount /dev/mqueue", e))?;
    for (link, target) in [
        ("/dev/ptmx", "pts/ptmx"),
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
        ("/dev/core", "/proc/kcore"),
    ] {
        std::os::unix::fs::symlink(target, link).map_err(|e| err(format!("symlink {link}"), e))?;
    }
    Ok(())
}

fn mask_paths() -> Result<(), String> {
    for path in MASKED_PATHS {
        mask_path(path)?;
    }
    for path in READ_ONLY_PATHS {
        read_only_path(path)?;
    }
    Ok(())
}

/// Hides `path`: an empty read-only tmpfs over a directory, `/dev/null` over anything else.
/// A missing path is skipped.
fn mask_path(path: &str) -> Result<(), String> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let result = if meta.is_dir() {
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            Some("size=0"),
        )
    } else {
        mount(
            Some("/dev/null"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    };
    result.map_err(|e| err(format!("mask {path}"), e))
}

/// Makes `path` (a directory when missing) a mount of its own, so it stays writable when the
/// root is remounted read-only.
fn writable_path(path: &str) -> Result<(), String> {
    if std::fs::symlink_metadata(path).is_err() {
        mkdir_all(path)?;
    }
    bind_on_itself(path)
}

/// Bind-mounts `path` on itself and remounts it read-only. A missing path is skipped.
fn read_only_path(path: &str) -> Result<(), String> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    bind_on_itself(path)?;
    remount_read_only(path)
}

/// Makes `path` a mount of its own (with what is mounted below it), whose flags can then be
/// changed apart from its parent's.
fn bind_on_itself(path: &str) -> Result<(), String> {
    mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| err(format!("bind {path}"), e))
}

fn remount_read_only(path: &str) -> Result<(), String> {
    // A bind remount keeps the mount's other flags only if they are passed again; read them.
    let st = nix::sys::statvfs::statvfs(path).map_err(|e| err(format!("statvfs {path}"), e))?;
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
    let f = st.flags();
    for (vfs, ms) in [
        (nix::sys::statvfs::FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (nix::sys::statvfs::FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (nix::sys::statvfs::FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
    ] {
        if f.contains(vfs) {
            flags |= ms;
        }
    }
    mount(None::<&str>, path, None::<&str>, flags, None::<&str>)
        .map_err(|e| err(format!("remount {path} read-only"), e))
}

/// `mkdir -p` inside the container (after the pivot, so symlinks resolve inside it).
fn mkdir_all(path: &str) -> Result<(), String> {
    std::fs::create_dir_all(path).map_err(|e| err(format!("mkdir {path}"), e))
}

pub(crate) fn drop_capabilities() -> Result<(), String> {
    drop_bounding_set()?;
    restrict_capabilities()
}

/// Takes every capability outside the default set out of the bounding set, so no `execve`
/// (of a setuid or file-capability binary) can gain it. The process's own sets are left as
/// they are: a warm shell does this before its claim, and still mounts afterwards.
fn drop_bounding_set() -> Result<(), String> {
    for cap in caps::all() {
        if !DEFAULT_CAPS.contains(&cap) {
            caps::drop(None, caps::CapSet::Bounding, cap)
                .map_err(|e| err(format!("drop {cap} from the bounding set"), e))?;
        }
    }
    Ok(())
}

/// Reduces the inheritable, effective and permitted sets to the default set (the bounding
/// set already is).
///
/// One `capget` and one `capset` for the three sets, where the `caps` crate makes three of
/// each (it sets one set at a time): this runs on every sandbox start, and each syscall is
/// several microseconds on a virtualized host.
fn restrict_capabilities() -> Result<(), String> {
    /// `struct __user_cap_header_struct` (linux/capability.h).
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    /// `struct __user_cap_data_struct`; version 3 takes two: capabilities 0–31, 32–63.
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut keep = [0u32; 2];
    for cap in DEFAULT_CAPS {
        let bit = cap.index();
        keep[usize::from(bit / 32)] |= 1 << (bit % 32);
    }
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: header and data are what capget(2) and capset(2) take for version 3; the
    // kernel reads and writes only within them.
    #[allow(unsafe_code)]
    let got = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if got != 0 {
        return Err(err("read capabilities", nix::errno::Errno::last()));
    }
    for (d, k) in data.iter_mut().zip(keep) {
        d.effective &= k;
        d.permitted &= k;
        d.inheritable &= k;
    }
    // SAFETY: as above.
    #[allow(unsafe_code)]
    let set = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if set != 0 {
        return Err(err("set capabilities", nix::errno::Errno::last()));
    }
    Ok(())
}

/// `argv[0]` as a path: taken as is when it holds a `/`, else the first executable file of
/// that name in the container's `PATH` (the image's, or the usual default).
pub(crate) fn find_program(argv: &[String], env: &[String]) -> Result<CString, String> {
    let name = argv.first().ok_or_else(|| {
        "no command: the image has no entrypoint or cmd and none was given".to_string()
    })?;
    if name.is_empty() {
        return Err("the command is empty".to_string());
    }
    if name.contains('/') {
        return CString::new(name.as_str()).map_err(|e| err("argv[0]", e));
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = format!("{dir}/{name}");
        if nix::unistd::access(candidate.as_str(), nix::unistd::AccessFlags::X_OK).is_ok()
            && std::fs::metadata(&candidate).is_ok_and(|m| m.is_file())
        {
            return CString::new(candidate).map_err(|e| err("argv[0]", e));
        }
    }
    Err(format!(
        "exec {name:?}: executable file not found in $PATH ({path})"
    ))
}

fn to_cstrings(what: &str, items: &[String]) -> Result<Vec<CString>, String> {
    items
        .iter()
        .map(|s| CString::new(s.as_str()).map_err(|e| err(format!("{what} entry {s:?}"), e)))
        .collect()
}

/// Signal dispositions survive `execve` when ignored, and the mask always does: the Rust
/// runtime ignores SIGPIPE and the supervisor blocks SIGCHLD/SIGTERM; a workload starts with
/// neither.
fn reset_signals() {
    use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, sigprocmask};
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    for sig in [
        Signal::SIGPIPE,
        Signal::SIGTERM,
        Signal::SIGCHLD,
        Signal::SIGINT,
    ] {
        // SAFETY: SIG_DFL installs no handler, so no Rust code can run in a signal context.
        #[allow(unsafe_code)]
        let _ = unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) };
    }
}

/// Marks every descriptor above stderr close-on-exec, so the workload inherits only stdio.
pub(crate) fn close_other_fds() {
    // SAFETY: close_range takes plain integers; with CLOSE_RANGE_CLOEXEC it only sets a flag.
    #[allow(unsafe_code)]
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
    }
}

/// Sets (or clears) IFF_UP on `lo` in the new network namespace, so the workload can (or
/// cannot) use 127.0.0.1.
fn set_loopback(up: bool) -> std::io::Result<()> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    #[allow(unsafe_code)]
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own; the socket is open.
    #[allow(unsafe_code)]
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if up {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        } else {
            req.ifr_ifru.ifru_flags &= !(libc::IFF_UP as libc::c_short);
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::open_mount_source;

    /// A mount source is mounted as the path it was resolved to, or not at all: one that
    /// leads elsewhere since (a directory swapped for a symlink) is refused, naming both.
    #[test]
    fn a_mount_source_that_leads_elsewhere_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let dir = std::fs::canonicalize(d.path()).unwrap();
        std::fs::create_dir(dir.join("data")).unwrap();
        std::fs::create_dir(dir.join("elsewhere")).unwrap();
        assert!(open_mount_source(&dir.join("data")).is_ok());
        std::fs::remove_dir(dir.join("data")).unwrap();
        std::os::unix::fs::symlink(dir.join("elsewhere"), dir.join("data")).unwrap();
        let e = open_mount_source(&dir.join("data")).unwrap_err();
        assert_eq!(
            e,
            format!(
                "mount source {} now leads to {} (changed since the sandbox was created)",
                dir.join("data").display(),
                dir.join("elsewhere").display()
            )
        );
    }
}
