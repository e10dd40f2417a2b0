//! The default seccomp profile: a deny-list compiled to classic BPF with `seccompiler`.
//!
//! # Design
//!
//! docker's default profile is an allow-list of ~350 syscalls plus capability-gated exceptions;
//! it needs libseccomp (a C library) and a JSON interpreter for its profile format. warren's
//! sandboxes already run with a reduced capability set, so most privileged syscalls fail anyway;
//! what the filter must add is a wall around the syscalls that are dangerous *even when the
//! capability checks pass or are reached through a user namespace*: mounting, loading kernel
//! code, tracing other processes, the host clock, keyrings, and so on. A deny-list states that
//! intent directly, keeps the filter small (one compare per denied syscall, and the kernel's
//! seccomp action cache turns every other syscall into a bitmap lookup), and does not break
//! programs that use syscalls newer than the profile.
//!
//! `seccompiler` (Firecracker's compiler, pure Rust, no libseccomp) turns a map of syscall
//! number -> rules into BPF. Four things it does not do are added here:
//!
//! * **Names.** It keeps its syscall-name table private, so [`syscall_number`] looks names up
//!   in a table built from `libc::SYS_*` constants (the names both glibc and musl `libc`
//!   define), plus the numbers `libc` lacks written out by hand: recent syscalls (`cachestat`
//!   to `open_tree_attr`, Linux 6.5-6.15), removed x86_64 ones, and a few aarch64 ones only
//!   the glibc flavour defines.
//! * **ABI checks.** Its prologue kills the process when `seccomp_data.arch` is not the native
//!   one, so i386 (`int 0x80`) syscalls cannot bypass the filter; 32-bit binaries therefore do
//!   not run under it (docker allows them). On x86_64 the *x32* ABI reports the same arch with
//!   bit 30 set in the syscall number, so [`compile`] splices in a check that kills on any
//!   number >= `0x4000_0000`, as libseccomp does.
//! * **`clone3`.** Its flags live in a struct behind a pointer, which BPF cannot read, so
//!   `CLONE_NEWUSER` could not be filtered. Like docker, `clone3` fails with `ENOSYS`, which
//!   makes glibc and musl fall back to `clone`, whose flags argument *is* checked.
//!
//! Denied syscalls fail with `EPERM` rather than killing the process, so programs that probe
//! (e.g. `unshare` to test for namespaces, `io_uring_setup` in libuv) degrade gracefully.
//!
//! * **Dispatch.** It tests syscall numbers one after another (the default profile: 326
//!   instructions). `seccomp/tree.rs` rebuilds that as a binary search over number ranges (96
//!   instructions), which the kernel installs in ~75 µs instead of ~235 µs
//!   (`examples/seccomp-install.rs`), a cost every sandbox start pays.
//!
//! Compiling the default profile measured 15 µs in a release build and 130-200 µs
//! unoptimized on the development machine (`seccomp::tests::compile_cost`);
//! [`compiled_with`] memoizes programs per deny-list and policy hash (a hit costs ~150 ns), so
//! sandboxes, which normally share one or two lists and policies, pay it once.
//!
//! A policy's `syscalls` ([`compile_with`]) either adds to the deny-list or, as an allow-list,
//! inverts the filter (default `EPERM`) while still refusing the default deny-list.
//! [`install`] runs in a forked child before `execve`, so it only makes syscalls and never
//! allocates.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use nix::errno::Errno;
use warren_spec::{ArgCondition, ArgOp, SyscallEntry, SyscallPolicy};

pub use crate::config::PolicySyscalls;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

/// Syscalls denied with `EPERM` unconditionally.
///
/// Names the running architecture does not have (e.g. `iopl` on aarch64) are skipped. i386-only
/// syscalls (`vm86`, `vm86old`) are absent: every i386 syscall is refused by the arch check.
/// `create_module`, `get_kernel_syms` and `query_module` were removed from Linux in 2.6 and
/// return `ENOSYS`; they are listed for parity with docker.
pub const DEFAULT_DENY: &[&str] = &[
    // Mounts and the new mount API: a sandbox gets its mounts from the runtime.
    "mount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "open_tree_attr",
    "mount_setattr",
    // Joining other namespaces.
    "setns",
    // Kernel code and the machine itself.
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "bpf",
    "perf_event_open",
    "lookup_dcookie",
    "iopl",
    "ioperm",
    "uselib",
    "nfsservctl",
    "_sysctl",
    "sysfs",
    "ustat",
    "syslog",
    "vhangup",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    // The host clock is not namespaced.
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    // The kernel keyring is not namespaced.
    "keyctl",
    "add_key",
    "request_key",
    // Reaching into other processes (docker gates these on CAP_SYS_PTRACE / CAP_SYS_NICE).
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "move_pages",
    "migrate_pages",
    // File handles bypass path-based confinement ("shocker").
    "open_by_handle_at",
    "name_to_handle_at",
    // Large, frequently exploited attack surfaces; callers fall back when refused.
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
];

/// Syscalls denied only for some arguments: `unshare` and `clone` with `CLONE_NEWUSER` (an
/// unprivileged user namespace would give the sandbox a full capability set over new
/// namespaces), and `personality` with anything but the values docker allows (`PER_LINUX`,
/// `PER_LINUX32`, `UNAME26` and combinations, and the `0xffffffff` query), because other
/// personalities change kernel behaviour such as `READ_IMPLIES_EXEC` or address layout.
/// `clone3` always fails with `ENOSYS` (see the module docs). Naming `unshare`, `clone` or
/// `personality` in `extra_deny` denies it unconditionally.
pub const CONDITIONAL_DENY: &[&str] = &["unshare", "clone", "personality", "clone3"];

/// `personality(2)` values that stay allowed.
const ALLOWED_PERSONALITIES: &[u64] = &[0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// Bound on the memo table of [`compiled`]; reaching it clears the table, which only costs
/// recompiles (tenant-chosen deny-lists must not grow memory without bound).
const CACHE_CAPACITY: usize = 64;

/// Errors from building a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A name in a syscall list is not a syscall on this architecture.
    #[error("{field}: {name:?} is not a syscall on {arch}", arch = std::env::consts::ARCH)]
    UnknownSyscall {
        /// Where the name was given, e.g. `spec.denySyscalls[1]`.
        field: String,
        /// The name as given.
        name: String,
    },
    /// seccompiler has no support for the architecture this was built for.
    #[error("seccomp filters are not supported on architecture {arch:?}")]
    UnsupportedArch {
        /// `std::env::consts::ARCH`.
        arch: &'static str,
    },
    /// seccompiler rejected the rules.
    #[error("compile the seccomp filter")]
    Compile(#[source] seccompiler::BackendError),
    /// seccompiler's output no longer starts with the arch check this module splices after.
    #[error("unexpected seccomp filter layout from seccompiler: {0}")]
    Layout(&'static str),
    /// The program exceeds the kernel's limit on BPF instructions.
    #[error("seccomp filter has {len} instructions, the kernel accepts at most {max}")]
    TooLarge {
        /// Instructions in the program.
        len: usize,
        /// The kernel limit.
        max: usize,
    },
}

/// Compiles the default profile plus `extra_deny` (syscall names) into a BPF program that
/// allows every other syscall.
pub fn compile(extra_deny: &[String]) -> Result<Arc<BpfProgram>, SeccompError> {
    compile_with(extra_deny, None)
}

/// Compiles the default profile, `extra_deny` and a policy's syscall list.
///
/// * A policy **deny-list** adds its entries to the default deny-list (an entry with argument
///   conditions is denied only when they all hold; a plain name denies it outright).
/// * A policy **allow-list** inverts the filter: only its entries are allowed, everything
///   else fails with `EPERM`. The default deny-list still applies: its syscalls are dropped
///   from the allow-list, and `unshare`/`clone` with `CLONE_NEWUSER` and unusual
///   `personality` values stay denied (their conditions are added to the allow rules).
///   `extra_deny` is dropped from the allow-list too.
///
/// The syscall dispatch is a binary search ([`tree`]), not seccompiler's linear chain.
pub fn compile_with(
    extra_deny: &[String],
    policy: Option<&SyscallPolicy>,
) -> Result<Arc<BpfProgram>, SeccompError> {
    let linear = seccompiler_program(extra_deny, policy)?;
    splice_prologue(tree::balance(&linear)?).map(Arc::new)
}

/// [`compile_with`] with seccompiler's linear dispatch left as it is: the same decisions in a
/// longer program. For comparisons only (tests, `examples/seccomp-install.rs`).
pub fn compile_linear(
    extra_deny: &[String],
    policy: Option<&SyscallPolicy>,
) -> Result<Arc<BpfProgram>, SeccompError> {
    splice_prologue(seccompiler_program(extra_deny, policy)?).map(Arc::new)
}

/// seccompiler's program for the rules, before the prologue is spliced in.
fn seccompiler_program(
    extra_deny: &[String],
    policy: Option<&SyscallPolicy>,
) -> Result<BpfProgram, SeccompError> {
    let unsupported = || SeccompError::UnsupportedArch {
        arch: std::env::consts::ARCH,
    };
    // Without a name table the default deny-list would silently compile to nothing.
    if SYSCALLS.is_empty() {
        return Err(unsupported());
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|_| unsupported())?;
    let extra = extra_deny
        .iter()
        .enumerate()
        .map(|(i, name)| number_of(&format!("spec.denySyscalls[{i}]"), name))
        .collect::<Result<Vec<_>, _>>()?;
    let (rules, allow) = match policy.and_then(|p| p.allow.as_deref()) {
        Some(allow) => (allow_rules(allow, &extra)?, true),
        None => {
            let deny = policy.and_then(|p| p.deny.as_deref()).unwrap_or_default();
            (deny_rules(deny, &extra)?, false)
        }
    };
    let (on_match, otherwise) = if allow {
        (
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
        )
    } else {
        (
            SeccompAction::Errno(libc::EPERM as u32),
            SeccompAction::Allow,
        )
    };
    let filter =
        SeccompFilter::new(rules, otherwise, on_match, arch).map_err(SeccompError::Compile)?;
    filter.try_into().map_err(SeccompError::Compile)
}

fn number_of(field: &str, name: &str) -> Result<i64, SeccompError> {
    syscall_number(name).ok_or_else(|| SeccompError::UnknownSyscall {
        field: field.to_string(),
        name: name.to_string(),
    })
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    // 32-bit compares for values that fit (int arguments may carry garbage in the upper half),
    // 64-bit ones otherwise.
    let len = match op {
        SeccompCmpOp::MaskedEq(mask) if mask > u64::from(u32::MAX) => SeccompCmpArgLen::Qword,
        _ if value > u64::from(u32::MAX) => SeccompCmpArgLen::Qword,
        _ => SeccompCmpArgLen::Dword,
    };
    SeccompCondition::new(arg, len, op, value).map_err(SeccompError::Compile)
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conditions).map_err(SeccompError::Compile)
}

/// A policy entry's argument conditions.
fn conditions(args: &[ArgCondition]) -> Result<Vec<SeccompCondition>, SeccompError> {
    args.iter()
        .map(|a| {
            let op = match a.op {
                ArgOp::Eq => SeccompCmpOp::Eq,
                ArgOp::Ne => SeccompCmpOp::Ne,
                ArgOp::Lt => SeccompCmpOp::Lt,
                ArgOp::Le => SeccompCmpOp::Le,
                ArgOp::Gt => SeccompCmpOp::Gt,
                ArgOp::Ge => SeccompCmpOp::Ge,
                ArgOp::MaskedEq => SeccompCmpOp::MaskedEq(a.mask.unwrap_or(u64::MAX)),
            };
            cond(a.index, op, a.value)
        })
        .collect()
}

/// The default deny rules, `extra` and a policy deny-list: syscall -> rules that deny it.
fn deny_rules(
    deny: &[SyscallEntry],
    extra: &[i64],
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for name in DEFAULT_DENY {
        if let Some(nr) = syscall_number(name) {
            rules.insert(nr, Vec::new());
        }
    }
    // unshare(flags) and clone(flags, ...): flags is the first argument on x86_64 and aarch64.
    let newuser = libc::CLONE_NEWUSER as u64;
    for nr in [libc::SYS_unshare, libc::SYS_clone] {
        let newuser = cond(0, SeccompCmpOp::MaskedEq(newuser), newuser)?;
        rules.insert(nr, vec![rule(vec![newuser])?]);
    }
    let not_allowed = ALLOWED_PERSONALITIES
        .iter()
        .map(|&value| cond(0, SeccompCmpOp::Ne, value))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_personality, vec![rule(not_allowed)?]);

    // An empty rule chain matches unconditionally, replacing any argument condition.
    let unconditional = |rules: &mut BTreeMap<i64, Vec<SeccompRule>>, nr| {
        rules.insert(nr, Vec::new());
    };
    for &nr in extra {
        unconditional(&mut rules, nr);
    }
    for (i, entry) in deny.iter().enumerate() {
        let nr = number_of(&format!("policy.syscalls.deny[{i}].name"), entry.name())?;
        if entry.args().is_empty() {
            unconditional(&mut rules, nr);
            continue;
        }
        let extra_rule = rule(conditions(entry.args())?)?;
        match rules.get_mut(&nr) {
            // Already denied outright.
            Some(existing) if existing.is_empty() => {}
            Some(existing) => existing.push(extra_rule),
            None => {
                rules.insert(nr, vec![extra_rule]);
            }
        }
    }
    Ok(rules)
}

/// A policy allow-list minus the default deny-list and `extra`: syscall -> rules that allow it.
fn allow_rules(
    allow: &[SyscallEntry],
    extra: &[i64],
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let denied: Vec<i64> = DEFAULT_DENY
        .iter()
        .filter_map(|name| syscall_number(name))
        .chain(extra.iter().copied())
        .collect();
    let newuser = libc::CLONE_NEWUSER as u64;
    let mut rules: BTreeMap<i64, Vec<Vec<SeccompCondition>>> = BTreeMap::new();
    for (i, entry) in allow.iter().enumerate() {
        let nr = number_of(&format!("policy.syscalls.allow[{i}].name"), entry.name())?;
        if denied.contains(&nr) {
            continue;
        }
        let user = conditions(entry.args())?;
        let chains = rules.entry(nr).or_default();
        if nr == libc::SYS_unshare || nr == libc::SYS_clone {
            let mut all = user;
            all.push(cond(0, SeccompCmpOp::MaskedEq(newuser), 0)?);
            chains.push(all);
        } else if nr == libc::SYS_personality {
            for &value in ALLOWED_PERSONALITIES {
                let mut all = user.clone();
                all.push(cond(0, SeccompCmpOp::Eq, value)?);
                chains.push(all);
            }
        } else {
            chains.push(user);
        }
    }
    rules
        .into_iter()
        .map(|(nr, chains)| {
            // A chain without conditions allows the syscall outright.
            let rules = if chains.iter().any(Vec::is_empty) {
                Vec::new()
            } else {
                chains.into_iter().map(rule).collect::<Result<_, _>>()?
            };
            Ok((nr, rules))
        })
        .collect()
}

/// A cache key: the sorted, de-duplicated deny-list and the policy's hash.
type CacheKey = (Vec<String>, Option<String>);

/// [`compile`], memoized process-wide by the sorted, de-duplicated deny-list.
pub fn compiled(extra_deny: &[String]) -> Result<Arc<BpfProgram>, SeccompError> {
    compiled_with(extra_deny, None)
}

/// [`compile_with`], memoized process-wide by the sorted, de-duplicated deny-list and the
/// policy's hash (`sha256:` of its canonical spec), so sandboxes under one policy compile
/// its filter once.
pub fn compiled_with(
    extra_deny: &[String],
    policy: Option<&PolicySyscalls>,
) -> Result<Arc<BpfProgram>, SeccompError> {
    static CACHE: OnceLock<Mutex<HashMap<CacheKey, Arc<BpfProgram>>>> = OnceLock::new();
    let mut list = extra_deny.to_vec();
    list.sort();
    list.dedup();
    let key = (list, policy.map(|p| p.hash.clone()));
    let cache = CACHE.get_or_init(Mutex::default);
    // A panic while holding the lock cannot leave the map half-updated; keep using it.
    if let Some(program) = cache
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .get(&key)
    {
        return Ok(Arc::clone(program));
    }
    // Compile outside the lock; a concurrent miss compiles twice, which is harmless.
    let program = compile_with(&key.0, policy.map(|p| &p.syscalls))?;
    let mut map = cache
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if map.len() >= CACHE_CAPACITY {
        map.clear();
    }
    Ok(Arc::clone(map.entry(key).or_insert(program)))
}

/// Installs `program` on the calling thread, setting `no_new_privs` first (which the kernel
/// requires without `CAP_SYS_ADMIN`, and which keeps setuid binaries from gaining privileges;
/// seccompiler's `apply_filter` sets it, and a test checks the flag after an install).
///
/// Async-signal-safe: it makes two syscalls (`prctl` and `seccomp`) and does not allocate,
/// so a forked child of a multi-threaded parent may call it before `execve`.
pub fn install(program: &BpfProgram) -> Result<(), Errno> {
    seccompiler::apply_filter(program).map_err(|err| match err {
        seccompiler::Error::Prctl(io) | seccompiler::Error::Seccomp(io) => {
            Errno::from_raw(io.raw_os_error().unwrap_or(libc::EINVAL))
        }
        _ => Errno::EINVAL,
    })
}

/// The syscall number of `name` on the running architecture, if it has one.
pub fn syscall_number(name: &str) -> Option<i64> {
    SYSCALLS
        .iter()
        .chain(SYSCALLS_NOT_IN_LIBC)
        .find(|(sys_name, _)| sys_name.strip_prefix("SYS_") == Some(name))
        .map(|&(_, nr)| nr)
}

// Classic BPF opcodes (linux/bpf_common.h) for the spliced prologue: class | size/op | mode.
/// BPF_LD | BPF_W | BPF_ABS.
pub(crate) const BPF_LD_W_ABS: u16 = 0x20;
/// BPF_JMP | BPF_JEQ | BPF_K.
pub(crate) const BPF_JMP_JEQ_K: u16 = 0x15;
/// BPF_JMP | BPF_JGE | BPF_K.
const BPF_JMP_JGE_K: u16 = 0x35;
/// BPF_RET | BPF_K.
pub(crate) const BPF_RET_K: u16 = 0x06;
/// `offsetof(struct seccomp_data, nr)` and `arch`.
pub(crate) const SECCOMP_DATA_NR: u32 = 0;
pub(crate) const SECCOMP_DATA_ARCH: u32 = 4;
/// Kernel limit on a classic BPF program (`BPF_MAXINSNS`).
const BPF_MAX_LEN: usize = 4096;
/// Arch-validation instructions seccompiler emits first: load arch, compare, kill.
const ARCH_CHECK_LEN: usize = 3;

/// Inserts the x32 and `clone3` checks after seccompiler's arch check. The inserted code only
/// falls through or returns, and no jump crosses the insertion point (the arch check's
/// "matched" jump lands on its first instruction), so no offsets need fixing.
fn splice_prologue(mut program: BpfProgram) -> Result<BpfProgram, SeccompError> {
    let stmt = |code, k| sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let starts_with_arch_check = program.len() > ARCH_CHECK_LEN
        && program[0] == stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARCH)
        && program[1].code == BPF_JMP_JEQ_K
        && (program[1].jt, program[1].jf) == (1, 0)
        && program[2] == stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS);
    if !starts_with_arch_check {
        return Err(SeccompError::Layout("no arch check at the start"));
    }
    let skip_next = |code, k| sock_filter {
        code,
        jt: 0,
        jf: 1,
        k,
    };
    let mut prologue = vec![stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR)];
    #[cfg(target_arch = "x86_64")]
    prologue.extend([
        // x32 syscalls: nr has __X32_SYSCALL_BIT set.
        skip_next(BPF_JMP_JGE_K, 0x4000_0000),
        stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS),
    ]);
    prologue.extend([
        skip_next(BPF_JMP_JEQ_K, libc::SYS_clone3 as u32),
        stmt(
            BPF_RET_K,
            libc::SECCOMP_RET_ERRNO | (libc::ENOSYS as u32 & libc::SECCOMP_RET_DATA),
        ),
    ]);
    program.splice(ARCH_CHECK_LEN..ARCH_CHECK_LEN, prologue);
    if program.len() > BPF_MAX_LEN {
        return Err(SeccompError::TooLarge {
            len: program.len(),
            max: BPF_MAX_LEN,
        });
    }
    Ok(program)
}

/// Builds `&[("SYS_name", libc::SYS_name), ...]`; the names are `stringify!`d so a typo
/// cannot make a name and its number disagree.
macro_rules! syscall_table {
    ($($sys:ident),* $(,)?) => {
        &[$((stringify!($sys), libc::$sys as i64)),*]
    };
}

/// Every syscall that both the glibc and the musl flavour of `libc` define for x86_64.
#[cfg(target_arch = "x86_64")]
#[rustfmt::skip]
static SYSCALLS: &[(&str, i64)] = syscall_table! {
    SYS__sysctl, SYS_accept, SYS_accept4, SYS_access, SYS_acct, SYS_add_key, SYS_adjtimex,
    SYS_afs_syscall, SYS_alarm, SYS_arch_prctl, SYS_bind, SYS_bpf, SYS_brk, SYS_capget,
    SYS_capset, SYS_chdir, SYS_chmod, SYS_chown, SYS_chroot, SYS_clock_adjtime,
    SYS_clock_getres, SYS_clock_gettime, SYS_clock_nanosleep, SYS_clock_settime, SYS_clone,
    SYS_clone3, SYS_close, SYS_close_range, SYS_connect, SYS_copy_file_range, SYS_creat,
    SYS_delete_module, SYS_dup, SYS_dup2, SYS_dup3, SYS_epoll_create, SYS_epoll_create1,
    SYS_epoll_ctl, SYS_epoll_ctl_old, SYS_epoll_pwait, SYS_epoll_pwait2, SYS_epoll_wait,
    SYS_epoll_wait_old, SYS_eventfd, SYS_eventfd2, SYS_execve, SYS_execveat, SYS_exit,
    SYS_exit_group, SYS_faccessat, SYS_faccessat2, SYS_fadvise64, SYS_fallocate,
    SYS_fanotify_init, SYS_fanotify_mark, SYS_fchdir, SYS_fchmod, SYS_fchmodat, SYS_fchmodat2,
    SYS_fchown, SYS_fchownat, SYS_fcntl, SYS_fdatasync, SYS_fgetxattr, SYS_finit_module,
    SYS_flistxattr, SYS_flock, SYS_fork, SYS_fremovexattr, SYS_fsconfig, SYS_fsetxattr,
    SYS_fsmount, SYS_fsopen, SYS_fspick, SYS_fstat, SYS_fstatfs, SYS_fsync, SYS_ftruncate,
    SYS_futex, SYS_futex_waitv, SYS_futimesat, SYS_get_mempolicy, SYS_get_robust_list,
    SYS_get_thread_area, SYS_getcpu, SYS_getcwd, SYS_getdents, SYS_getdents64, SYS_getegid,
    SYS_geteuid, SYS_getgid, SYS_getgroups, SYS_getitimer, SYS_getpeername, SYS_getpgid,
    SYS_getpgrp, SYS_getpid, SYS_getpmsg, SYS_getppid, SYS_getpriority, SYS_getrandom,
    SYS_getresgid, SYS_getresuid, SYS_getrlimit, SYS_getrusage, SYS_getsid, SYS_getsockname,
    SYS_getsockopt, SYS_gettid, SYS_gettimeofday, SYS_getuid, SYS_getxattr, SYS_init_module,
    SYS_inotify_add_watch, SYS_inotify_init, SYS_inotify_init1, SYS_inotify_rm_watch,
    SYS_io_cancel, SYS_io_destroy, SYS_io_getevents, SYS_io_setup, SYS_io_submit,
    SYS_io_uring_enter, SYS_io_uring_register, SYS_io_uring_setup, SYS_ioctl, SYS_ioperm,
    SYS_iopl, SYS_ioprio_get, SYS_ioprio_set, SYS_kcmp, SYS_kexec_file_load, SYS_kexec_load,
    SYS_keyctl, SYS_kill, SYS_landlock_add_rule, SYS_landlock_create_ruleset,
    SYS_landlock_restrict_self, SYS_lchown, SYS_lgetxattr, SYS_link, SYS_linkat, SYS_listen,
    SYS_listxattr, SYS_llistxattr, SYS_lookup_dcookie, SYS_lremovexattr, SYS_lseek,
    SYS_lsetxattr, SYS_lstat, SYS_madvise, SYS_mbind, SYS_membarrier, SYS_memfd_create,
    SYS_memfd_secret, SYS_migrate_pages, SYS_mincore, SYS_mkdir, SYS_mkdirat, SYS_mknod,
    SYS_mknodat, SYS_mlock, SYS_mlock2, SYS_mlockall, SYS_mmap, SYS_modify_ldt, SYS_mount,
    SYS_mount_setattr, SYS_move_mount, SYS_move_pages, SYS_mprotect, SYS_mq_getsetattr,
    SYS_mq_notify, SYS_mq_open, SYS_mq_timedreceive, SYS_mq_timedsend, SYS_mq_unlink,
    SYS_mremap, SYS_mseal, SYS_msgctl, SYS_msgget, SYS_msgrcv, SYS_msgsnd, SYS_msync,
    SYS_munlock, SYS_munlockall, SYS_munmap, SYS_name_to_handle_at, SYS_nanosleep,
    SYS_newfstatat, SYS_nfsservctl, SYS_open, SYS_open_by_handle_at, SYS_open_tree, SYS_openat,
    SYS_openat2, SYS_pause, SYS_perf_event_open, SYS_personality, SYS_pidfd_getfd,
    SYS_pidfd_open, SYS_pidfd_send_signal, SYS_pipe, SYS_pipe2, SYS_pivot_root, SYS_pkey_alloc,
    SYS_pkey_free, SYS_pkey_mprotect, SYS_poll, SYS_ppoll, SYS_prctl, SYS_pread64, SYS_preadv,
    SYS_preadv2, SYS_prlimit64, SYS_process_madvise, SYS_process_mrelease, SYS_process_vm_readv,
    SYS_process_vm_writev, SYS_pselect6, SYS_ptrace, SYS_putpmsg, SYS_pwrite64, SYS_pwritev,
    SYS_pwritev2, SYS_quotactl, SYS_quotactl_fd, SYS_read, SYS_readahead, SYS_readlink,
    SYS_readlinkat, SYS_readv, SYS_reboot, SYS_recvfrom, SYS_recvmmsg, SYS_recvmsg,
    SYS_remap_file_pages, SYS_removexattr, SYS_rename, SYS_renameat, SYS_renameat2,
    SYS_request_key, SYS_restart_syscall, SYS_rmdir, SYS_rseq, SYS_rt_sigaction,
    SYS_rt_sigpending, SYS_rt_sigprocmask, SYS_rt_sigqueueinfo, SYS_rt_sigreturn,
    SYS_rt_sigsuspend, SYS_rt_sigtimedwait, SYS_rt_tgsigqueueinfo, SYS_sched_get_priority_max,
    SYS_sched_get_priority_min, SYS_sched_getaffinity, SYS_sched_getattr, SYS_sched_getparam,
    SYS_sched_getscheduler, SYS_sched_rr_get_interval, SYS_sched_setaffinity, SYS_sched_setattr,
    SYS_sched_setparam, SYS_sched_setscheduler, SYS_sched_yield, SYS_seccomp, SYS_security,
    SYS_select, SYS_semctl, SYS_semget, SYS_semop, SYS_semtimedop, SYS_sendfile, SYS_sendmmsg,
    SYS_sendmsg, SYS_sendto, SYS_set_mempolicy, SYS_set_mempolicy_home_node,
    SYS_set_robust_list, SYS_set_thread_area, SYS_set_tid_address, SYS_setdomainname,
    SYS_setfsgid, SYS_setfsuid, SYS_setgid, SYS_setgroups, SYS_sethostname, SYS_setitimer,
    SYS_setns, SYS_setpgid, SYS_setpriority, SYS_setregid, SYS_setresgid, SYS_setresuid,
    SYS_setreuid, SYS_setrlimit, SYS_setsid, SYS_setsockopt, SYS_settimeofday, SYS_setuid,
    SYS_setxattr, SYS_shmat, SYS_shmctl, SYS_shmdt, SYS_shmget, SYS_shutdown, SYS_sigaltstack,
    SYS_signalfd, SYS_signalfd4, SYS_socket, SYS_socketpair, SYS_splice, SYS_stat, SYS_statfs,
    SYS_statx, SYS_swapoff, SYS_swapon, SYS_symlink, SYS_symlinkat, SYS_sync,
    SYS_sync_file_range, SYS_syncfs, SYS_sysfs, SYS_sysinfo, SYS_syslog, SYS_tee, SYS_tgkill,
    SYS_time, SYS_timer_create, SYS_timer_delete, SYS_timer_getoverrun, SYS_timer_gettime,
    SYS_timer_settime, SYS_timerfd_create, SYS_timerfd_gettime, SYS_timerfd_settime, SYS_times,
    SYS_tkill, SYS_truncate, SYS_tuxcall, SYS_umask, SYS_umount2, SYS_uname, SYS_unlink,
    SYS_unlinkat, SYS_unshare, SYS_uselib, SYS_userfaultfd, SYS_ustat, SYS_utime, SYS_utimensat,
    SYS_utimes, SYS_vfork, SYS_vhangup, SYS_vmsplice, SYS_vserver, SYS_wait4, SYS_waitid,
    SYS_write, SYS_writev,
};

/// Every syscall that both the glibc and the musl flavour of `libc` define for aarch64.
#[cfg(target_arch = "aarch64")]
#[rustfmt::skip]
static SYSCALLS: &[(&str, i64)] = syscall_table! {
    SYS_accept, SYS_accept4, SYS_acct, SYS_add_key, SYS_adjtimex, SYS_bind, SYS_bpf, SYS_brk,
    SYS_capget, SYS_capset, SYS_chdir, SYS_chroot, SYS_clock_adjtime, SYS_clock_getres,
    SYS_clock_gettime, SYS_clock_nanosleep, SYS_clock_settime, SYS_clone, SYS_clone3, SYS_close,
    SYS_close_range, SYS_connect, SYS_copy_file_range, SYS_delete_module, SYS_dup, SYS_dup3,
    SYS_epoll_create1, SYS_epoll_ctl, SYS_epoll_pwait, SYS_epoll_pwait2, SYS_eventfd2,
    SYS_execve, SYS_execveat, SYS_exit, SYS_exit_group, SYS_faccessat, SYS_faccessat2,
    SYS_fadvise64, SYS_fallocate, SYS_fanotify_init, SYS_fanotify_mark, SYS_fchdir, SYS_fchmod,
    SYS_fchmodat, SYS_fchown, SYS_fchownat, SYS_fcntl, SYS_fdatasync, SYS_fgetxattr,
    SYS_finit_module, SYS_flistxattr, SYS_flock, SYS_fremovexattr, SYS_fsconfig, SYS_fsetxattr,
    SYS_fsmount, SYS_fsopen, SYS_fspick, SYS_fstat, SYS_fstatfs, SYS_fsync, SYS_ftruncate,
    SYS_futex, SYS_futex_waitv, SYS_get_mempolicy, SYS_get_robust_list, SYS_getcpu, SYS_getcwd,
    SYS_getdents64, SYS_getegid, SYS_geteuid, SYS_getgid, SYS_getgroups, SYS_getitimer,
    SYS_getpeername, SYS_getpgid, SYS_getpid, SYS_getppid, SYS_getpriority, SYS_getrandom,
    SYS_getresgid, SYS_getresuid, SYS_getrusage, SYS_getsid, SYS_getsockname, SYS_getsockopt,
    SYS_gettid, SYS_gettimeofday, SYS_getuid, SYS_getxattr, SYS_init_module,
    SYS_inotify_add_watch, SYS_inotify_init1, SYS_inotify_rm_watch, SYS_io_cancel,
    SYS_io_destroy, SYS_io_getevents, SYS_io_setup, SYS_io_submit, SYS_io_uring_enter,
    SYS_io_uring_register, SYS_io_uring_setup, SYS_ioctl, SYS_ioprio_get, SYS_ioprio_set,
    SYS_kcmp, SYS_kexec_load, SYS_keyctl, SYS_kill, SYS_landlock_add_rule,
    SYS_landlock_create_ruleset, SYS_landlock_restrict_self, SYS_lgetxattr, SYS_linkat,
    SYS_listen, SYS_listxattr, SYS_llistxattr, SYS_lookup_dcookie, SYS_lremovexattr, SYS_lseek,
    SYS_lsetxattr, SYS_madvise, SYS_mbind, SYS_membarrier, SYS_memfd_create, SYS_memfd_secret,
    SYS_migrate_pages, SYS_mincore, SYS_mkdirat, SYS_mknodat, SYS_mlock, SYS_mlock2,
    SYS_mlockall, SYS_mmap, SYS_mount, SYS_mount_setattr, SYS_move_mount, SYS_move_pages,
    SYS_mprotect, SYS_mq_getsetattr, SYS_mq_notify, SYS_mq_open, SYS_mq_timedreceive,
    SYS_mq_timedsend, SYS_mq_unlink, SYS_mremap, SYS_mseal, SYS_msgctl, SYS_msgget, SYS_msgrcv,
    SYS_msgsnd, SYS_msync, SYS_munlock, SYS_munlockall, SYS_munmap, SYS_name_to_handle_at,
    SYS_nanosleep, SYS_newfstatat, SYS_nfsservctl, SYS_open_by_handle_at, SYS_open_tree,
    SYS_openat, SYS_openat2, SYS_perf_event_open, SYS_personality, SYS_pidfd_getfd,
    SYS_pidfd_open, SYS_pidfd_send_signal, SYS_pipe2, SYS_pivot_root, SYS_pkey_alloc,
    SYS_pkey_free, SYS_pkey_mprotect, SYS_ppoll, SYS_prctl, SYS_pread64, SYS_preadv,
    SYS_preadv2, SYS_prlimit64, SYS_process_madvise, SYS_process_mrelease, SYS_process_vm_readv,
    SYS_process_vm_writev, SYS_pselect6, SYS_ptrace, SYS_pwrite64, SYS_pwritev, SYS_pwritev2,
    SYS_quotactl, SYS_quotactl_fd, SYS_read, SYS_readahead, SYS_readlinkat, SYS_readv,
    SYS_reboot, SYS_recvfrom, SYS_recvmmsg, SYS_recvmsg, SYS_remap_file_pages, SYS_removexattr,
    SYS_renameat2, SYS_request_key, SYS_restart_syscall, SYS_rseq, SYS_rt_sigaction,
    SYS_rt_sigpending, SYS_rt_sigprocmask, SYS_rt_sigqueueinfo, SYS_rt_sigreturn,
    SYS_rt_sigsuspend, SYS_rt_sigtimedwait, SYS_rt_tgsigqueueinfo, SYS_sched_get_priority_max,
    SYS_sched_get_priority_min, SYS_sched_getaffinity, SYS_sched_getattr, SYS_sched_getparam,
    SYS_sched_getscheduler, SYS_sched_rr_get_interval, SYS_sched_setaffinity, SYS_sched_setattr,
    SYS_sched_setparam, SYS_sched_setscheduler, SYS_sched_yield, SYS_seccomp, SYS_semctl,
    SYS_semget, SYS_semop, SYS_semtimedop, SYS_sendfile, SYS_sendmmsg, SYS_sendmsg, SYS_sendto,
    SYS_set_mempolicy, SYS_set_mempolicy_home_node, SYS_set_robust_list, SYS_set_tid_address,
    SYS_setdomainname, SYS_setfsgid, SYS_setfsuid, SYS_setgid, SYS_setgroups, SYS_sethostname,
    SYS_setitimer, SYS_setns, SYS_setpgid, SYS_setpriority, SYS_setregid, SYS_setresgid,
    SYS_setresuid, SYS_setreuid, SYS_setsid, SYS_setsockopt, SYS_settimeofday, SYS_setuid,
    SYS_setxattr, SYS_shmat, SYS_shmctl, SYS_shmdt, SYS_shmget, SYS_shutdown, SYS_sigaltstack,
    SYS_signalfd4, SYS_socket, SYS_socketpair, SYS_splice, SYS_statfs, SYS_statx, SYS_swapoff,
    SYS_swapon, SYS_symlinkat, SYS_sync, SYS_syncfs, SYS_sysinfo, SYS_syslog, SYS_tee,
    SYS_tgkill, SYS_timer_create, SYS_timer_delete, SYS_timer_getoverrun, SYS_timer_gettime,
    SYS_timer_settime, SYS_timerfd_create, SYS_timerfd_gettime, SYS_timerfd_settime, SYS_times,
    SYS_tkill, SYS_truncate, SYS_umask, SYS_umount2, SYS_uname, SYS_unlinkat, SYS_unshare,
    SYS_userfaultfd, SYS_utimensat, SYS_vhangup, SYS_vmsplice, SYS_wait4, SYS_waitid, SYS_write,
    SYS_writev,
};

/// Syscalls `libc` does not define (in both flavours). Numbers 424 and up are shared by all
/// architectures (arch/*/syscall*.tbl); the rest come from the arch's own table.
#[rustfmt::skip]
static SYSCALLS_NOT_IN_LIBC: &[(&str, i64)] = &[
    #[cfg(target_arch = "x86_64")] ("SYS_create_module", 174),
    #[cfg(target_arch = "x86_64")] ("SYS_get_kernel_syms", 177),
    #[cfg(target_arch = "x86_64")] ("SYS_query_module", 178),
    #[cfg(target_arch = "x86_64")] ("SYS_io_pgetevents", 333),
    #[cfg(target_arch = "aarch64")] ("SYS_sync_file_range", 84),
    #[cfg(target_arch = "aarch64")] ("SYS_renameat", 38),
    #[cfg(target_arch = "aarch64")] ("SYS_getrlimit", 163),
    #[cfg(target_arch = "aarch64")] ("SYS_setrlimit", 164),
    #[cfg(target_arch = "aarch64")] ("SYS_io_pgetevents", 292),
    #[cfg(target_arch = "aarch64")] ("SYS_kexec_file_load", 294),
    #[cfg(target_arch = "aarch64")] ("SYS_fchmodat2", 452),
    ("SYS_cachestat", 451),
    ("SYS_map_shadow_stack", 453),
    ("SYS_futex_wake", 454),
    ("SYS_futex_wait", 455),
    ("SYS_futex_requeue", 456),
    ("SYS_statmount", 457),
    ("SYS_listmount", 458),
    ("SYS_lsm_get_self_attr", 459),
    ("SYS_lsm_set_self_attr", 460),
    ("SYS_lsm_list_modules", 461),
    ("SYS_setxattrat", 463),
    ("SYS_getxattrat", 464),
    ("SYS_listxattrat", 465),
    ("SYS_removexattrat", 466),
    ("SYS_open_tree_attr", 467),
];

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
static SYSCALLS: &[(&str, i64)] = &[];

#[cfg(test)]
#[path = "seccomp_tests.rs"]
mod tests;

mod tree;
