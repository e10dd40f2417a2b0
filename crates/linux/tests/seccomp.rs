//! The default seccomp profile installed in real child processes (busybox-static at
//! /bin/busybox runs the probes).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use seccompiler::BpfProgram;
use warren_linux::seccomp;

const BUSYBOX: &str = "/bin/busybox";

/// Runs `busybox ARGS` with `program` installed between fork and exec.
fn run_filtered(program: &Arc<BpfProgram>, args: &[&str]) -> Output {
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing (apt-get install busybox-static)"
    );
    let program = Arc::clone(program);
    let mut command = Command::new(BUSYBOX);
    command.args(args);
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before execve; `install` is
    // async-signal-safe (two syscalls, no allocation) and the program was built before the
    // fork, so the closure takes no locks another thread of the parent might have held.
    unsafe {
        command.pre_exec(move || seccomp::install(&program).map_err(std::io::Error::from));
    }
    command.output().expect("spawn busybox")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn allowed_syscalls_work() {
    let program = seccomp::compile(&[]).unwrap();
    let output = run_filtered(&program, &["true"]);
    assert!(output.status.success(), "{output:?}");
    let output = run_filtered(&program, &["sh", "-c", "echo hi | cat; ls / >/dev/null"]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(output.stdout, b"hi\n");
}

#[test]
fn extra_deny_mkdir_gives_eperm() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("made");
    let target = target.to_str().unwrap();

    let default = seccomp::compile(&[]).unwrap();
    let output = run_filtered(&default, &["mkdir", target]);
    assert!(output.status.success(), "{output:?}");
    assert!(Path::new(target).is_dir());
    std::fs::remove_dir(target).unwrap();

    let deny = seccomp::compiled(&["mkdir".into(), "mkdirat".into()]).unwrap();
    let output = run_filtered(&deny, &["mkdir", target]);
    assert!(!output.status.success(), "{output:?}");
    assert!(
        stderr(&output).contains("Operation not permitted"),
        "{output:?}"
    );
    assert!(!Path::new(target).exists());
}

/// Unmounts the directory if the filter ever failed to stop the mount.
struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn mount_is_denied() {
    let dir = tempfile::tempdir().unwrap();
    let _unmount = Unmount(dir.path());
    let program = seccomp::compile(&[]).unwrap();
    let target = dir.path().to_str().unwrap();
    let args = ["mount", "-t", "tmpfs", "none", target];

    // Control: root may mount here without the filter.
    let output = Command::new(BUSYBOX).args(args).output().unwrap();
    assert!(output.status.success(), "{output:?}");
    nix::mount::umount2(dir.path(), nix::mount::MntFlags::MNT_DETACH).unwrap();

    let output = run_filtered(&program, &args);
    assert!(!output.status.success(), "{output:?}");
    // busybox reports EPERM from mount(2) as "permission denied (are you root?)".
    assert!(stderr(&output).contains("permission denied"), "{output:?}");
}

#[test]
fn user_namespaces_are_denied_but_others_are_not() {
    let program = seccomp::compile(&[]).unwrap();
    let output = run_filtered(&program, &["unshare", "-U", "true"]);
    assert!(!output.status.success(), "{output:?}");
    assert!(
        stderr(&output).contains("Operation not permitted"),
        "{output:?}"
    );
    // A UTS namespace without a user namespace only needs CAP_SYS_ADMIN, which root has here.
    let output = run_filtered(&program, &["unshare", "-u", "true"]);
    assert!(output.status.success(), "{output:?}");
}

/// Raw syscalls in a forked child: results the shell tools cannot show.
#[test]
#[cfg(target_arch = "x86_64")]
fn raw_syscalls_in_a_forked_child() {
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork};

    let program = seccomp::compile(&[]).unwrap();
    #[allow(unsafe_code)]
    // SAFETY: the child only makes raw syscalls and calls `_exit`; it touches no lock or
    // allocator state another thread of the test harness might hold.
    let child = match unsafe { fork() }.unwrap() {
        ForkResult::Parent { child } => child,
        ForkResult::Child => {
            // Exit code: the number of the first failed check, 0 if all passed.
            let code = (|| {
                if seccomp::install(&program).is_err() {
                    return 1;
                }
                let errno = || nix::errno::Errno::last_raw();
                #[allow(unsafe_code)]
                // SAFETY: raw syscalls with scalar or null arguments; each is denied or fails
                // before touching memory, and clone3 with a null struct fails with EFAULT if
                // it gets through the filter.
                unsafe {
                    if libc::syscall(libc::SYS_clone3, 0usize, 0usize) != -1
                        || errno() != libc::ENOSYS
                    {
                        return 2;
                    }
                    if libc::unshare(libc::CLONE_NEWUSER) != -1 || errno() != libc::EPERM {
                        return 3;
                    }
                    if libc::personality(0xffff_ffff) == -1 {
                        return 4;
                    }
                    if libc::personality(0x0040_0000) != -1 || errno() != libc::EPERM {
                        return 5;
                    }
                    if libc::syscall(libc::SYS_getpid) <= 0 {
                        return 6;
                    }
                    // An i386 syscall (getpid through int 0x80): the arch check kills us.
                    std::arch::asm!("int 0x80", inlateout("eax") 20 => _);
                }
                7
            })();
            // SAFETY: `_exit` skips the parent's atexit handlers and buffered I/O, as a forked
            // child must.
            #[allow(unsafe_code)]
            unsafe {
                libc::_exit(code)
            }
        }
    };
    match waitpid(child, None).unwrap() {
        WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGSYS, _) => {}
        other => panic!("child ended with {other:?}; exit code = number of the failed check"),
    }
}
