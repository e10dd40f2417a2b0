//! What putting a new process into its cgroup costs: forked and then moved by a write to
//! `cgroup.procs` (what the child does on v1, and on v2 without `clone3`), or made in the
//! cgroup by `clone3(CLONE_INTO_CGROUP)` (warren on v2, `warren_linux::fork`). Root; needs a
//! cgroup2 mount (a hybrid host's `unified` will do) and, for the v1 line, a v1 memory
//! hierarchy at /sys/fs/cgroup/memory.
//!
//! `cargo run --release -p warren-linux --example clone-into-cgroup [-- RUNS]`
//!
//! Each run is timed in the parent from just before the fork to the child's word that it is
//! in the cgroup; the three ways are interleaved, so they see the same machine.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::sys::wait::{WaitStatus, waitpid};
use warren_linux::cgroup::CgroupLayout;
use warren_linux::fork::{Forked, fork_into};

/// Forks a child that joins the cgroup whose `cgroup.procs` is `procs` (or is born in `dir`),
/// and returns the microseconds until it said so.
fn one(dir: Option<BorrowedFd<'_>>, procs: Option<&CString>) -> u64 {
    let (read, write) = nix::unistd::pipe().expect("pipe");
    let started = Instant::now();
    // SAFETY: the child makes only async-signal-safe calls (open, write, _exit).
    match unsafe { fork_into(dir) }.expect("fork") {
        Forked::Child { in_cgroup } => {
            let mut ok = in_cgroup == dir.is_some();
            if let Some(procs) = procs {
                // SAFETY: a NUL-terminated path; a two-byte buffer.
                unsafe {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                    ok &= fd >= 0 && libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                }
            }
            // SAFETY: one byte from a live buffer, then an exit without the parent's handlers.
            unsafe {
                libc::write(write.as_raw_fd(), [u8::from(ok)].as_ptr().cast(), 1);
                libc::_exit(0)
            }
        }
        Forked::Parent { child } => {
            drop(write);
            let mut byte = [0u8; 1];
            let n = nix::unistd::read(&read, &mut byte).expect("read");
            let took = started.elapsed().as_micros() as u64;
            let status = waitpid(child, None).expect("waitpid");
            assert!(
                n == 1 && byte[0] == 1 && matches!(status, WaitStatus::Exited(_, 0)),
                "the child could not join its cgroup ({status:?})"
            );
            took
        }
    }
}

/// A cgroup made for the run, removed at its end.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn procs(dir: &Path) -> CString {
    CString::new(
        dir.join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .expect("path")
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("RUNS: a number"))
        .unwrap_or(300);
    let name = format!("warren-clone-bench-{}", std::process::id());
    let v2 = Dir(CgroupLayout::cgroup2_mount()
        .expect("no cgroup2 mount here")
        .join(&name));
    std::fs::create_dir(&v2.0).expect("mkdir the v2 cgroup");
    let v2_fd = std::fs::File::open(&v2.0).expect("open the v2 cgroup");
    let v1 = Path::new("/sys/fs/cgroup/memory")
        .exists()
        .then(|| Dir(Path::new("/sys/fs/cgroup/memory").join(&name)));
    if let Some(v1) = &v1 {
        std::fs::create_dir(&v1.0).expect("mkdir the v1 cgroup");
    }
    let (v2_procs, v1_procs) = (procs(&v2.0), v1.as_ref().map(|d| procs(&d.0)));
    let (mut clone, mut fork_v2, mut fork_v1) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        clone.push(one(Some(v2_fd.as_fd()), None));
        fork_v2.push(one(None, Some(&v2_procs)));
        if let Some(p) = &v1_procs {
            fork_v1.push(one(None, Some(p)));
        }
    }
    let quantile = |v: &mut Vec<u64>, q: f64| {
        v.sort_unstable();
        v[((v.len() - 1) as f64 * q).round() as usize]
    };
    println!("{runs} runs each, µs from fork to the child in its cgroup:");
    for (what, v) in [
        ("clone3(CLONE_INTO_CGROUP), v2", &mut clone),
        ("fork + cgroup.procs, v2", &mut fork_v2),
        ("fork + cgroup.procs, v1 memory", &mut fork_v1),
    ] {
        if v.is_empty() {
            println!("{what:32} (no v1 memory hierarchy here)");
            continue;
        }
        println!(
            "{what:32} p50 {:6}  p90 {:6}  p99 {:6}  max {:6}",
            quantile(v, 0.5),
            quantile(v, 0.9),
            quantile(v, 0.99),
            quantile(v, 1.0)
        );
    }
}
