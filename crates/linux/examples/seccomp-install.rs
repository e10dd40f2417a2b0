//! What installing the default seccomp profile costs in a fresh process, with the balanced
//! dispatch warren uses and with seccompiler's linear one, side by side (root not needed).
//!
//! `cargo run --release -p warren-linux --example seccomp-install [-- RUNS]`
//!
//! The kernel fills its action cache at install by running the filter for every syscall
//! number, so the cost follows the length of the walk, not of the program.
#![allow(unsafe_code)]

use std::time::Instant;

use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::ForkResult;

/// Microseconds the install took in a forked child (which writes them on a pipe).
fn install_in_child(program: &seccompiler::BpfProgram) -> u32 {
    let (read, write) = nix::unistd::pipe().expect("pipe");
    // SAFETY: the child only installs the filter, writes four bytes (no allocation) and exits.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        ForkResult::Child => {
            let started = Instant::now();
            let micros = match warren_linux::seccomp::install(program) {
                Ok(()) => started.elapsed().as_micros() as u32,
                Err(_) => u32::MAX,
            };
            let _ = nix::unistd::write(&write, &micros.to_ne_bytes());
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            drop(write);
            let mut bytes = [0u8; 4];
            let n = nix::unistd::read(&read, &mut bytes).expect("read");
            let status = waitpid(child, None).expect("waitpid");
            assert!(
                n == 4 && matches!(status, WaitStatus::Exited(_, 0)),
                "the child ended as {status:?}"
            );
            let micros = u32::from_ne_bytes(bytes);
            assert_ne!(micros, u32::MAX, "the child could not install the filter");
            micros
        }
    }
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("RUNS: a number"))
        .unwrap_or(200);
    let balanced = warren_linux::seccomp::compile_with(&[], None).expect("compile");
    let linear = warren_linux::seccomp::compile_linear(&[], None).expect("compile");
    let (mut b, mut l) = (Vec::new(), Vec::new());
    // Interleaved, so both see the same machine.
    for _ in 0..runs {
        b.push(install_in_child(&balanced));
        l.push(install_in_child(&linear));
    }
    let quantile = |v: &mut Vec<u32>, q: f64| {
        v.sort_unstable();
        v[((v.len() - 1) as f64 * q).round() as usize]
    };
    for (name, len, v) in [
        ("balanced", balanced.len(), &mut b),
        ("linear", linear.len(), &mut l),
    ] {
        println!(
            "{name:<9} {len:>4} instructions  install p50 {:>4} µs  p90 {:>4} µs  ({runs} runs)",
            quantile(v, 0.5),
            quantile(v, 0.9)
        );
    }
    println!(
        "balanced/linear p50: {:.2}x",
        f64::from(quantile(&mut b, 0.5)) / f64::from(quantile(&mut l, 0.5))
    );
}
