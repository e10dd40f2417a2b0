//! The raw syscalls of the exec gate: installing the notifying filter, the listener's ioctls,
//! `openat2`, and passing a descriptor over a unix socket. Everything `unsafe` of the gate is
//! here; callers see owned descriptors and plain values.

use std::ffi::CString;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use seccompiler::sock_filter;

/// `AUDIT_ARCH_*` of the running architecture (`linux/audit.h`).
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

use crate::seccomp::{BPF_JMP_JEQ_K, BPF_LD_W_ABS, BPF_RET_K, SECCOMP_DATA_ARCH, SECCOMP_DATA_NR};

/// The gate's filter: `execve` and `execveat` of the native architecture go to the listener,
/// everything else is allowed (the sandbox's main filter, installed beside it, rules the
/// rest and kills foreign architectures).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub fn gate_program() -> Vec<sock_filter> {
    let stmt = |code, k| sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |k, jt, jf| sock_filter {
        code: BPF_JMP_JEQ_K,
        jt,
        jf,
        k,
    };
    vec![
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARCH),
        jump(AUDIT_ARCH, 1, 0),
        stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR),
        jump(libc::SYS_execve as u32, 2, 0),
        jump(libc::SYS_execveat as u32, 1, 0),
        stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(BPF_RET_K, libc::SECCOMP_RET_USER_NOTIF),
    ]
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub fn gate_program() -> Vec<sock_filter> {
    Vec::new()
}

/// Installs `program` on the calling thread with a new listener and returns the listener.
/// Sets `no_new_privs` first (required without `CAP_SYS_ADMIN`). Allocation-free.
pub fn install_listener(program: &[sock_filter]) -> Result<OwnedFd, Errno> {
    if program.is_empty() {
        return Err(Errno::ENOSYS);
    }
    nix::sys::prctl::set_no_new_privs()?;
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `prog` points at `program`, which outlives the call; the kernel copies the
    // filter. SECCOMP_FILTER_FLAG_NEW_LISTENER makes the call return a new descriptor.
    #[allow(unsafe_code)]
    let fd = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &prog as *const libc::sock_fprog,
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    #[allow(unsafe_code)]
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A notification: the calling task (its id in the supervisor's pid namespace) and the
/// syscall's number and arguments.
#[derive(Debug, Clone, Copy)]
pub struct Notification {
    pub id: u64,
    pub tid: i32,
    pub nr: i64,
    pub args: [u64; 6],
}

/// Receives one pending notification. Call only when the listener polls readable: the
/// ioctl blocks while none is pending. `ENOENT`: its caller died in the meantime.
pub fn receive(listener: BorrowedFd<'_>) -> Result<Notification, Errno> {
    // SAFETY: seccomp_notif is plain old data; zeroed is the value the kernel requires.
    #[allow(unsafe_code)]
    let mut notif: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: the ioctl writes one seccomp_notif into the struct we own.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_RECV,
            &mut notif as *mut libc::seccomp_notif,
        )
    };
    if rc < 0 {
        return Err(Errno::last());
    }
    Ok(Notification {
        id: notif.id,
        tid: notif.pid as i32,
        nr: i64::from(notif.data.nr),
        args: notif.data.args,
    })
}

/// Whether notification `id` is still pending: its caller has not died, so a pid read from
/// it still names that caller.
pub fn still_valid(listener: BorrowedFd<'_>, id: u64) -> bool {
    // SAFETY: the ioctl reads one u64 we own.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_ID_VALID,
            &id as *const u64,
        )
    };
    rc == 0
}

/// Answers notification `id`: `None` lets the syscall run (`CONTINUE`), `Some(errno)` fails
/// it. `ENOENT`: its caller died in the meantime.
pub fn answer(listener: BorrowedFd<'_>, id: u64, error: Option<Errno>) -> Result<(), Errno> {
    let resp = libc::seccomp_notif_resp {
        id,
        val: 0,
        error: error.map_or(0, |e| -(e as i32)),
        flags: if error.is_none() {
            libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32
        } else {
            0
        },
    };
    // SAFETY: the ioctl reads one seccomp_notif_resp we own.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SEND,
            &resp as *const libc::seccomp_notif_resp,
        )
    };
    if rc < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// `openat2(dir, path, O_PATH | O_NOFOLLOW, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`: the
/// last component itself (a symlink is not followed), every other lookup kept inside `dir`
/// as if it were `/`, whatever a concurrent rename or symlink does.
pub fn open_in_root(dir: BorrowedFd<'_>, path: &str) -> Result<OwnedFd, Errno> {
    let path = CString::new(path).map_err(|_| Errno::EINVAL)?;
    // SAFETY: open_how is plain old data; zeroed is valid (libc marks it non-exhaustive).
    #[allow(unsafe_code)]
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `path` is NUL-terminated and `how` is a valid open_how; both outlive the call.
    #[allow(unsafe_code)]
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    #[allow(unsafe_code)]
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends `fd` over the connected datagram socket `sock` (one byte of payload).
pub fn send_fd(sock: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> Result<(), Errno> {
    use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
    let fds = [fd.as_raw_fd()];
    sendmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &[IoSlice::new(b"g")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map(drop)
}

/// Receives the descriptors of one datagram on `sock` (non-blocking; `EAGAIN` when none).
/// Descriptors arrive close-on-exec.
pub fn receive_fds(sock: BorrowedFd<'_>) -> Result<Vec<OwnedFd>, Errno> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixAddr, recvmsg};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut out = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: SCM_RIGHTS installed these descriptors in this process for us;
                // nothing else owns them.
                #[allow(unsafe_code)]
                out.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok(out)
}
