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
    let mut files = Vec::new();
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
