//! The guest's raw system calls: what runs between fork and exec, terminal ioctls, the
//! kernel's entropy ioctls and the final reboot. Every `unsafe` block of the guest is here.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// What a child does between fork and exec, all async-signal-safe (no allocation): a new
/// session (and the terminal as its controlling one), the cgroup, the root, the directory,
/// the user.
#[derive(Debug, Clone)]
pub struct Enter {
    pub cgroup_procs: Option<std::ffi::CString>,
    pub root: Option<std::ffi::CString>,
    pub cwd: std::ffi::CString,
    pub uid: u32,
    pub gid: u32,
    pub tty: bool,
}

/// Installs [`Enter`] as the command's pre-exec step.
pub fn pre_exec(cmd: &mut std::process::Command, enter: Enter) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs in the forked child before exec. It only makes system calls
    // through nix with borrowed C strings prepared before the fork: no allocation, no lock,
    // nothing that is not async-signal-safe.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || enter_child(&enter));
    }
}

fn enter_child(e: &Enter) -> std::io::Result<()> {
    use nix::unistd::{Gid, Uid};
    nix::unistd::setsid()?;
    if e.tty {
        // SAFETY: TIOCSCTTY on stdin (the terminal's slave side, set up by the caller) takes
        // an int argument and touches no memory of ours.
        #[allow(unsafe_code)]
        let r = unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
        if r == -1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    if let Some(procs) = &e.cgroup_procs {
        let fd = nix::fcntl::open(
            procs.as_c_str(),
            nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        nix::unistd::write(&fd, b"0")?;
    }
    if let Some(root) = &e.root {
        nix::unistd::chroot(root.as_c_str())?;
    }
    nix::unistd::chdir(e.cwd.as_c_str())?;
    nix::unistd::setgroups(&[])?;
    nix::unistd::setgid(Gid::from_raw(e.gid))?;
    nix::unistd::setuid(Uid::from_raw(e.uid))?;
    Ok(())
}

/// Registers a descriptor with tokio's reactor.
pub fn async_fd(fd: OwnedFd) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the descriptor, so nothing else can close or replace it while
    // it is registered.
    #[allow(unsafe_code)]
    unsafe {
        tokio::io::unix::AsyncFd::register(fd).map_err(std::io::Error::from)
    }
}

/// Sets a terminal's window size.
pub fn set_window_size(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> std::io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which lives across the call.
    #[allow(unsafe_code)]
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes `seed` into the kernel's input pool, credited as entropy, and forces the CRNG to
/// reseed from it: after a snapshot restore every clone holds the template's CRNG state, and
/// only a reseed makes their random numbers differ at once (a plain write to /dev/urandom
/// would wait for the next scheduled reseed).
pub fn reseed(random: RawFd, seed: &[u8]) -> std::io::Result<()> {
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let words = seed.len().div_ceil(4);
    let mut info = vec![0u32; 2 + words];
    info[0] = (seed.len() * 8) as u32;
    info[1] = seed.len() as u32;
    for (i, chunk) in seed.chunks(4).enumerate() {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(word);
    }
    // SAFETY: the kernel reads `8 + buf_size` bytes from the pointer; `info` holds that many
    // (two ints, then `words * 4 >= seed.len()` bytes) and lives across the call.
    #[allow(unsafe_code)]
    let r = unsafe { libc::ioctl(random, RNDADDENTROPY, info.as_ptr()) };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    #[allow(unsafe_code)]
    let r = unsafe { libc::ioctl(random, RNDRESEEDCRNG) };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Loads a kernel module from a file.
pub fn load_module(path: &std::path::Path) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    match nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Ends the VM: the kernel runs with `reboot=t` under qemu's `-no-reboot`, so a reboot
/// makes qemu exit at once (no ACPI power-off dance).
pub fn reboot() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Only reached when not allowed to reboot (not PID 1 in a VM): stop here.
    std::process::exit(1)
}
