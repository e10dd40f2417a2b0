//! Gives the crate a build id: a hash of its own sources and of the workspace crates it is
//! built from (the supervisor writes logs with warren-runtime's writer and reads warren-spec's
//! types: a change there changes what it does). The server compares it with the
//! `warren-supervise` binary beside it, so a supervisor built from other sources (a stale
//! binary after a partial rebuild) is never used.

use std::hash::{Hash, Hasher};

fn main() {
    // This crate's sources and those of its workspace dependencies (Cargo.toml lists them).
    let roots = ["src", "../runtime/src", "../spec/src", "../image/src"];
    for root in roots {
        println!("cargo:rerun-if-changed={root}");
    }
    // And what decides how they are built: the manifests (the workspace's too: its
    // dependency features, its profiles), the locked versions of every crate (a new nix or
    // seccompiler changes the supervisor too), this script.
    let mut files: Vec<std::path::PathBuf> = [
        "Cargo.toml",
        "build.rs",
        "../../Cargo.toml",
        "../../Cargo.lock",
        "../runtime/Cargo.toml",
        "../spec/Cargo.toml",
        "../image/Cargo.toml",
    ]
    .iter()
    .map(Into::into)
    .collect();
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let mut dirs: Vec<std::path::PathBuf> = roots.iter().map(Into::into).collect();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for file in files {
        file.hash(&mut hasher);
        std::fs::read(&file).unwrap_or_default().hash(&mut hasher);
    }
    println!(
        "cargo:rustc-env=WARREN_LINUX_BUILD_ID={}-{:016x}",
        std::env::var("CARGO_PKG_VERSION").unwrap_or_default(),
        hasher.finish()
    );
}
