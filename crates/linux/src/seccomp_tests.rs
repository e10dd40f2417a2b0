use std::collections::HashSet;
use std::time::Instant;

use super::*;

const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
const AUDIT_ARCH_AARCH64: u32 = 183 | 0x8000_0000 | 0x4000_0000;
const AUDIT_ARCH_I386: u32 = 3 | 0x4000_0000;

fn native_arch() -> u32 {
    if cfg!(target_arch = "x86_64") {
        AUDIT_ARCH_X86_64
    } else {
        AUDIT_ARCH_AARCH64
    }
}

/// A classic-BPF interpreter for the instructions seccompiler and the prologue emit, run on a
/// `struct seccomp_data` (nr, arch, instruction pointer, six arguments).
fn run(program: &[sock_filter], arch: u32, nr: i64, args: [u64; 6]) -> u32 {
    run_counting(program, arch, nr, args).0
}

/// [`run`], also returning how many instructions it executed.
fn run_counting(program: &[sock_filter], arch: u32, nr: i64, args: [u64; 6]) -> (u32, usize) {
    let mut data = Vec::new();
    data.extend_from_slice(&(nr as i32).to_ne_bytes());
    data.extend_from_slice(&arch.to_ne_bytes());
    data.extend_from_slice(&0u64.to_ne_bytes());
    for arg in args {
        data.extend_from_slice(&arg.to_ne_bytes());
    }
    let (mut acc, mut pc, mut steps) = (0u32, 0usize, 0usize);
    loop {
        let insn = &program[pc];
        pc += 1;
        steps += 1;
        match insn.code {
            0x20 => {
                let at = insn.k as usize;
                acc = u32::from_ne_bytes(data[at..at + 4].try_into().unwrap());
            }
            0x54 => acc &= insn.k,
            0x05 => pc += insn.k as usize,
            0x06 => return (insn.k, steps),
            code @ (0x15 | 0x25 | 0x35 | 0x45) => {
                let taken = match code {
                    0x15 => acc == insn.k,
                    0x25 => acc > insn.k,
                    0x35 => acc >= insn.k,
                    _ => acc & insn.k != 0,
                };
                pc += usize::from(if taken { insn.jt } else { insn.jf });
            }
            other => panic!("unexpected BPF opcode {other:#x} at {}", pc - 1),
        }
    }
}

const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
const ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
const KILL: u32 = libc::SECCOMP_RET_KILL_PROCESS;

fn eval(program: &[sock_filter], nr: i64, arg0: u64) -> u32 {
    run(program, native_arch(), nr, [arg0, 0, 0, 0, 0, 0])
}

#[test]
#[cfg(target_arch = "x86_64")]
fn x86_64_numbers_match_the_kernel_table() {
    for (name, nr) in [
        ("read", 0),
        ("mkdir", 83),
        ("personality", 135),
        ("mount", 165),
        ("create_module", 174),
        ("unshare", 272),
        ("clone3", 435),
        ("mseal", 462),
        ("open_tree_attr", 467),
    ] {
        assert_eq!(syscall_number(name), Some(nr), "{name}");
    }
    assert_eq!(syscall_number("SYS_read"), None);
    assert_eq!(syscall_number("mkdri"), None);
}

#[test]
fn table_has_no_duplicate_names() {
    let mut seen = HashSet::new();
    for (name, _) in SYSCALLS.iter().chain(SYSCALLS_NOT_IN_LIBC) {
        assert!(name.starts_with("SYS_"), "{name}");
        assert!(seen.insert(*name), "{name} listed twice");
    }
    assert!(seen.len() > 300, "only {} syscalls", seen.len());
}

#[test]
#[cfg(target_arch = "x86_64")]
fn every_default_deny_name_exists_on_x86_64() {
    for name in DEFAULT_DENY.iter().chain(CONDITIONAL_DENY) {
        assert!(syscall_number(name).is_some(), "{name}");
    }
}

#[test]
fn unknown_name_is_an_error_naming_it() {
    let err = compile(&["mkdir".into(), "mkdri".into()]).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            r#"spec.denySyscalls[1]: "mkdri" is not a syscall on {}"#,
            std::env::consts::ARCH
        )
    );
    let policy = deny_policy(&["ptrace", "chmdo"]);
    let err = compile_with(&[], Some(&policy)).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(r#"policy.syscalls.deny[1].name: "chmdo" is not a syscall"#),
        "{err}"
    );
}

fn deny_policy(names: &[&str]) -> SyscallPolicy {
    SyscallPolicy {
        allow: None,
        deny: Some(
            names
                .iter()
                .map(|n| SyscallEntry::Name(n.to_string()))
                .collect(),
        ),
    }
}

fn allow_policy(names: &[&str]) -> SyscallPolicy {
    SyscallPolicy {
        allow: deny_policy(names).deny,
        deny: None,
    }
}

#[test]
fn policy_deny_list_adds_to_the_defaults() {
    let program = compile_with(&[], Some(&deny_policy(&["chmod", "fchmodat"]))).unwrap();
    let fchmodat = syscall_number("fchmodat").unwrap();
    assert_eq!(eval(&program, fchmodat, 0), EPERM);
    assert_eq!(eval(&program, libc::SYS_ptrace, 0), EPERM);
    assert_eq!(eval(&program, syscall_number("mkdirat").unwrap(), 0), ALLOW);
}

/// `socket(AF_INET6, ...)`: a rule with an argument condition.
fn inet6_sockets() -> SyscallEntry {
    SyscallEntry::Rule(warren_spec::SyscallRule {
        name: "socket".into(),
        args: vec![ArgCondition {
            index: 0,
            op: ArgOp::Eq,
            value: libc::AF_INET6 as u64,
            mask: None,
        }],
    })
}

#[test]
fn policy_argument_conditions_narrow_the_rule() {
    let policy = SyscallPolicy {
        allow: None,
        deny: Some(vec![inet6_sockets()]),
    };
    let program = compile_with(&[], Some(&policy)).unwrap();
    assert_eq!(
        eval(&program, libc::SYS_socket, libc::AF_INET6 as u64),
        EPERM
    );
    assert_eq!(
        eval(&program, libc::SYS_socket, libc::AF_INET as u64),
        ALLOW
    );
}

#[test]
fn policy_allow_list_denies_the_rest_and_keeps_the_defaults() {
    let program = compile_with(
        &["getpid".into()],
        Some(&allow_policy(&[
            "read",
            "write",
            "mount",
            "clone",
            "personality",
            "getpid",
        ])),
    )
    .unwrap();
    assert_eq!(eval(&program, syscall_number("read").unwrap(), 0), ALLOW);
    assert_eq!(eval(&program, syscall_number("openat").unwrap(), 0), EPERM);
    // The default deny-list and the spec's deny-list win over the allow-list.
    assert_eq!(eval(&program, libc::SYS_mount, 0), EPERM);
    assert_eq!(eval(&program, libc::SYS_getpid, 0), EPERM);
    let newuser = libc::CLONE_NEWUSER as u64;
    assert_eq!(eval(&program, libc::SYS_clone, newuser), EPERM);
    assert_eq!(eval(&program, libc::SYS_clone, libc::SIGCHLD as u64), ALLOW);
    assert_eq!(eval(&program, libc::SYS_personality, 0), ALLOW);
    assert_eq!(eval(&program, libc::SYS_personality, 0x40_0000), EPERM);
    assert_eq!(eval(&program, libc::SYS_clone3, 0), ENOSYS);
}

#[test]
fn compiled_with_a_policy_is_cached_by_its_hash() {
    let policy = PolicySyscalls {
        hash: "sha256:test-cache-hit".into(),
        syscalls: deny_policy(&["chmod"]),
    };
    let a = compiled_with(&[], Some(&policy)).unwrap();
    let b = compiled_with(&[], Some(&policy.clone())).unwrap();
    assert!(Arc::ptr_eq(&a, &b), "the second sandbox reuses the program");
    let other = PolicySyscalls {
        hash: "sha256:test-cache-other".into(),
        ..policy
    };
    assert!(!Arc::ptr_eq(&a, &compiled_with(&[], Some(&other)).unwrap()));
}

#[test]
fn default_profile_denies_the_list_and_allows_the_rest() {
    let program = compile(&[]).unwrap();
    for name in DEFAULT_DENY {
        if let Some(nr) = syscall_number(name) {
            assert_eq!(eval(&program, nr, 0), EPERM, "{name}");
        }
    }
    for name in [
        "read", "write", "openat", "mkdirat", "execve", "getpid", "chroot",
    ] {
        let nr = syscall_number(name).unwrap();
        assert_eq!(eval(&program, nr, 0), ALLOW, "{name}");
    }
}

#[test]
fn namespace_and_personality_rules_look_at_arguments() {
    let program = compile(&[]).unwrap();
    let newuser = libc::CLONE_NEWUSER as u64;
    let newns = libc::CLONE_NEWNS as u64;
    for nr in [libc::SYS_unshare, libc::SYS_clone] {
        assert_eq!(eval(&program, nr, newuser), EPERM);
        assert_eq!(eval(&program, nr, newuser | newns), EPERM);
        assert_eq!(eval(&program, nr, newns), ALLOW);
        // What fork() and pthread_create() pass.
        assert_eq!(eval(&program, nr, libc::SIGCHLD as u64), ALLOW);
    }
    assert_eq!(eval(&program, libc::SYS_clone3, 0), ENOSYS);
    for allowed in [0, 8, 0x2_0000, 0x2_0008, 0xffff_ffff] {
        assert_eq!(eval(&program, libc::SYS_personality, allowed), ALLOW);
    }
    // READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE.
    for denied in [0x40_0000, 0x4_0000] {
        assert_eq!(eval(&program, libc::SYS_personality, denied), EPERM);
    }
}

#[test]
fn extra_deny_adds_and_overrides_conditions() {
    let program = compile(&["mkdir".into(), "mkdirat".into(), "unshare".into()]).unwrap();
    assert_eq!(eval(&program, syscall_number("mkdirat").unwrap(), 0), EPERM);
    assert_eq!(
        eval(&program, libc::SYS_unshare, libc::CLONE_NEWNS as u64),
        EPERM
    );
    assert_eq!(
        eval(&program, libc::SYS_clone, libc::CLONE_NEWNS as u64),
        ALLOW
    );
}

#[test]
fn foreign_abis_are_killed() {
    let program = compile(&[]).unwrap();
    // i386 getpid (20) through int 0x80.
    assert_eq!(run(&program, AUDIT_ARCH_I386, 20, [0; 6]), KILL);
    if cfg!(target_arch = "x86_64") {
        // x32 mount: __X32_SYSCALL_BIT | 165.
        assert_eq!(eval(&program, 0x4000_0000 | 165, 0), KILL);
        assert_eq!(eval(&program, 0x4000_0000 | 39, 0), KILL);
    }
}

#[test]
fn prologue_follows_the_arch_check() {
    let program = compile(&[]).unwrap();
    assert_eq!(program[0].k, SECCOMP_DATA_ARCH);
    assert_eq!(program[2].k, libc::SECCOMP_RET_KILL_PROCESS);
    assert_eq!(
        (program[3].code, program[3].k),
        (BPF_LD_W_ABS, SECCOMP_DATA_NR)
    );
    // A program without the arch check is refused, not silently mangled.
    let bare = vec![sock_filter {
        code: BPF_RET_K,
        jt: 0,
        jf: 0,
        k: ALLOW,
    }];
    assert!(matches!(
        splice_prologue(bare),
        Err(SeccompError::Layout(_))
    ));
}

#[test]
fn compiled_is_memoized_by_sorted_list() {
    let a = compiled(&["mkdirat".into(), "mkdir".into()]).unwrap();
    let b = compiled(&["mkdir".into(), "mkdirat".into(), "mkdir".into()]).unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(*a, *compile(&["mkdir".into(), "mkdirat".into()]).unwrap());
    assert!(compiled(&["mkdri".into()]).is_err());
}

/// Prints what compiling costs; run with `--nocapture` to see it.
#[test]
fn compile_cost() {
    let rounds = 200;
    let started = Instant::now();
    for _ in 0..rounds {
        compile(&["mkdir".into()]).unwrap();
    }
    let per_compile = started.elapsed() / rounds;
    let started = Instant::now();
    for _ in 0..rounds {
        compiled(&["mkdir".into()]).unwrap();
    }
    let per_lookup = started.elapsed() / rounds;
    let len = compile(&[]).unwrap().len();
    eprintln!("seccomp: compile {per_compile:?}, cached {per_lookup:?}, {len} instructions");
}

/// The policies the balanced-dispatch tests compare: the default profile, a deny-list with
/// argument conditions, an allow-list (inverted default) and a spec deny-list.
fn profiles() -> Vec<(Vec<String>, Option<SyscallPolicy>)> {
    let conditional = SyscallPolicy {
        allow: None,
        deny: Some(vec![SyscallEntry::Name("chmod".into()), inet6_sockets()]),
    };
    let allow = allow_policy(&[
        "read",
        "write",
        "exit_group",
        "clone",
        "personality",
        "mount",
    ]);
    // Every other syscall: ~180 ranges apart, more than `jt`/`jf` can jump across.
    let mut numbered: Vec<&(&str, i64)> = SYSCALLS.iter().collect();
    numbered.sort_by_key(|(_, nr)| *nr);
    let alternate: Vec<&str> = numbered
        .iter()
        .step_by(2)
        .map(|(name, _)| name.trim_start_matches("SYS_"))
        .collect();
    vec![
        (vec![], None),
        (vec!["mkdir".into(), "getpid".into()], None),
        (vec![], Some(conditional)),
        (vec!["write".into()], Some(allow)),
        (vec![], Some(allow_policy(&alternate))),
    ]
}

#[test]
fn balanced_dispatch_decides_as_seccompilers_linear_one() {
    let args = [
        [0; 6],
        [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0, 0],
        [libc::AF_INET6 as u64, 1, 0, 0, 0, 0],
        [0x40_0000, 0, 0, 0, 0, 0],
        [u64::MAX; 6],
        [0xffff_ffff, 0x2_0008, 8, 0x1000_0000, 1, 2],
    ];
    for (extra, policy) in profiles() {
        let tree = compile_with(&extra, policy.as_ref()).unwrap();
        let linear = compile_linear(&extra, policy.as_ref()).unwrap();
        assert_ne!(tree, linear, "the dispatch was not rebuilt");
        let numbers = (-1..1100).chain([0x4000_0000, 0x4000_0000 | 165, i64::from(i32::MAX)]);
        for nr in numbers {
            for a in args {
                for arch in [native_arch(), AUDIT_ARCH_I386] {
                    assert_eq!(
                        run(&tree, arch, nr, a),
                        run(&linear, arch, nr, a),
                        "syscall {nr} args {a:?} arch {arch:#x} under {extra:?} {policy:?}"
                    );
                }
            }
        }
    }
}

/// What the kernel's action cache emulates per syscall at install, and what an uncached
/// syscall walks at run time: a few dozen instructions, not the whole list.
#[test]
fn balanced_dispatch_is_short() {
    for (i, (extra, policy)) in profiles().into_iter().enumerate() {
        // (most, total) instructions executed over the syscall numbers the cache covers.
        let walked = |program: &[sock_filter]| {
            let steps: Vec<usize> = (0..512)
                .map(|nr| run_counting(program, native_arch(), nr, [0; 6]).1)
                .collect();
            (*steps.iter().max().unwrap(), steps.iter().sum::<usize>())
        };
        let (tree_most, tree_total) = walked(&compile_with(&extra, policy.as_ref()).unwrap());
        let (linear_most, linear_total) = walked(&compile_linear(&extra, policy.as_ref()).unwrap());
        assert!(
            tree_most <= 30,
            "{tree_most} steps at most (linear: {linear_most})"
        );
        // The default profile's ~100 syscalls; the small allow-list is short either way.
        if i == 0 {
            assert!(
                linear_total > 4 * tree_total,
                "{tree_total} steps in all against {linear_total} linear"
            );
        }
    }
}

#[test]
fn balance_refuses_a_layout_it_does_not_know() {
    let insn = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    let mut program = compile_linear(&[], None).unwrap().to_vec();
    // The linear program with the prologue spliced in no longer has the number load at 3.
    assert!(matches!(
        tree::balance(&program),
        Err(SeccompError::Layout(_))
    ));
    // Raw layout: head, then a block whose rule jumps past the block's end.
    program.drain(3..8);
    assert!(tree::balance(&program).is_ok());
    let rule = 4 + 3;
    program[rule] = insn(0x15, 200, 0, 0);
    assert!(matches!(
        tree::balance(&program),
        Err(SeccompError::Layout(_))
    ));
}

/// `install` relies on seccompiler's `apply_filter` to set `no_new_privs` (the kernel refuses
/// a filter from a process without it and without `CAP_SYS_ADMIN`, and the flag keeps setuid
/// binaries from gaining privileges): checked in a forked child, as an installed filter
/// cannot be taken off.
#[test]
fn install_sets_no_new_privs() {
    let program = compile_with(&[], None).unwrap();
    // SAFETY: the child makes only raw syscalls (no allocation, no lock) and ends in _exit.
    #[allow(unsafe_code)]
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            let code = match install(&program) {
                // SAFETY: PR_GET_NO_NEW_PRIVS takes no pointers.
                #[allow(unsafe_code)]
                Ok(()) => unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) },
                Err(_) => 2,
            };
            // SAFETY: ends the forked child without running the test harness's handlers.
            #[allow(unsafe_code)]
            unsafe {
                libc::_exit(code)
            }
        }
        nix::unistd::ForkResult::Parent { child } => {
            let status = nix::sys::wait::waitpid(child, None).unwrap();
            assert_eq!(
                status,
                nix::sys::wait::WaitStatus::Exited(child, 1),
                "exit 1: no_new_privs set; 0: not set; 2: the install failed"
            );
        }
    }
}
