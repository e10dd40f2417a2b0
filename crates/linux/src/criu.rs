//! CRIU, the program that checkpoints and restores the linux backend's sandboxes: which
//! binary warren uses, and the command lines it runs.
//!
//! **The `criu` command line, not `rust-criu` (RPC to `criu swrk`).** Both start one criu
//! process per dump or restore, so they cost the same; the command line needs no protobuf
//! dependency, its whole request is visible in `ps` and in the log, and the two features
//! warren relies on are plain flags: `--restore-detached` (the restored tree is reparented to
//! the calling supervisor, a child subreaper) and `--action-script` (a hook that runs while
//! the dumped tree is still frozen, which is when the overlay's upper directory is copied).
//! swrk's one extra, restoring the tree as a sibling of the caller, is what the subreaper
//! already gives.
//!
//! **Which binary.** Debian 12's criu 3.17 cannot dump on newer kernels ("Unexpected rt vDSO
//! area bounds"), and Debian's containerd/runc pull it into `/usr/sbin`. warren therefore
//! uses, in order: the path the server was given (`--criu`), `$WARREN_CRIU`, the one
//! `scripts/install-criu.sh` builds (`/usr/local/lib/warren/criu/criu`), then `criu` on
//! `PATH`; and only a binary that reports version 4 or later.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Where `scripts/install-criu.sh` installs CRIU.
pub const INSTALLED_PATH: &str = "/usr/local/lib/warren/criu/criu";
/// Overrides the CRIU binary (as the server's `--criu` does).
pub const ENV: &str = "WARREN_CRIU";
/// The oldest CRIU major version warren uses.
pub const MIN_MAJOR: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error(
        "no usable CRIU (4.x) found: {tried}; install it with scripts/install-criu.sh, or name one with --criu or ${ENV}"
    )]
    NotFound { tried: String },
    #[error("{path} is criu {version}; checkpoints need criu {MIN_MAJOR}.x or later")]
    TooOld { path: String, version: String },
    #[error("cannot run {path}")]
    Run {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("criu {action} failed: {reason} (the whole log: {log})")]
    Failed {
        action: &'static str,
        reason: String,
        log: String,
    },
}

/// A CRIU binary and the version it reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Criu {
    pub path: PathBuf,
    /// "4.1.1".
    pub version: String,
}

impl Criu {
    /// The CRIU warren uses (see the module docs for the order).
    pub fn find(configured: Option<&Path>) -> Result<Criu, CriuError> {
        if let Some(path) = configured {
            return Criu::at(path);
        }
        if let Some(path) = std::env::var_os(ENV).filter(|p| !p.is_empty()) {
            return Criu::at(Path::new(&path));
        }
        let mut tried = Vec::new();
        let mut candidates = vec![PathBuf::from(INSTALLED_PATH)];
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path).map(|d| d.join("criu")));
        }
        for candidate in candidates {
            if !candidate.is_file() {
                continue;
            }
            match Criu::at(&candidate) {
                Ok(criu) => return Ok(criu),
                Err(e) => tried.push(crate::error_chain(&e)),
            }
        }
        if tried.is_empty() {
            tried.push(format!("neither {INSTALLED_PATH} nor criu on PATH exists"));
        }
        Err(CriuError::NotFound {
            tried: tried.join("; "),
        })
    }

    /// The binary at `path`, if it runs and is recent enough.
    pub fn at(path: &Path) -> Result<Criu, CriuError> {
        let out = std::process::Command::new(path)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|source| CriuError::Run {
                path: path.display().to_string(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = parse_version(&text).ok_or_else(|| CriuError::TooOld {
            path: path.display().to_string(),
            version: format!("of unknown version ({:?})", text.trim()),
        })?;
        if version.0 < MIN_MAJOR {
            return Err(CriuError::TooOld {
                path: path.display().to_string(),
                version: format!("{}.{}.{}", version.0, version.1, version.2),
            });
        }
        Ok(Criu {
            path: path.to_path_buf(),
            version: format!("{}.{}.{}", version.0, version.1, version.2),
        })
    }
}

/// `criu --version`'s "Version: 4.1.1" (or "Version: 4.1") as numbers.
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))?;
    let mut parts = line.trim().split('.').map(|p| p.trim().parse::<u32>());
    let major = parts.next()?.ok()?;
    let minor = parts.next().unwrap_or(Ok(0)).ok()?;
    let patch = parts.next().unwrap_or(Ok(0)).ok()?;
    Some((major, minor, patch))
}

/// A bind mount from the host, which CRIU dumps as an external mount: `--external
/// mnt[GUEST]:COOKIE` at dump, `--external mnt[COOKIE]:HOST` at restore.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalMount {
    pub guest: String,
    pub cookie: String,
}

/// What a dump needs.
#[derive(Debug, Clone)]
pub struct DumpPlan<'a> {
    /// The container's init, in the host's pid namespace.
    pub pid: i32,
    pub images: &'a Path,
    /// Where CRIU's log and stats go (not the images: they are the checkpoint's payload).
    pub work: &'a Path,
    pub leave_running: bool,
    /// Run while the tree is frozen after the dump (CRIU's `post-dump` action).
    pub hook: &'a Path,
    /// Files the init holds from outside the container, as CRIU names them
    /// (`file[MNT_ID:INODE]`).
    pub external_files: &'a [String],
    pub mounts: &'a [ExternalMount],
}

/// The log file name of a dump, in its work dir.
pub const DUMP_LOG: &str = "dump.log";
/// The log file name of a restore, in its work dir (the new sandbox's bundle).
pub const RESTORE_LOG: &str = "restore.log";

/// `criu dump ...` after the program name.
pub fn dump_args(plan: &DumpPlan<'_>) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "dump".into(),
        "--tree".into(),
        plan.pid.to_string().into(),
        "--images-dir".into(),
        plan.images.into(),
        "--work-dir".into(),
        plan.work.into(),
        "--log-file".into(),
        DUMP_LOG.into(),
        // Files unlinked while open, and file locks, are saved rather than refused.
        "--link-remap".into(),
        "--file-locks".into(),
        "--action-script".into(),
        plan.hook.into(),
    ];
    if plan.leave_running {
        args.push("--leave-running".into());
    }
    for file in plan.external_files {
        args.push("--external".into());
        args.push(file.into());
    }
    for m in plan.mounts {
        args.push("--external".into());
        args.push(format!("mnt[{}]:{}", m.guest, m.cookie).into());
    }
    args
}

/// What a restore needs. The descriptors named in `inherit` must be open (without
/// close-on-exec) in the process that runs CRIU.
#[derive(Debug, Clone)]
pub struct RestorePlan<'a> {
    pub images: &'a Path,
    /// The new sandbox's bundle: logs and the pid file go there.
    pub work: &'a Path,
    /// The new container's root, mounted in the restoring process's mount namespace.
    pub root: &'a Path,
    pub pidfile: &'a Path,
    /// (descriptor, what CRIU saw: `pipe:[INODE]` or `file[MNT_ID:INODE]`).
    pub inherit: &'a [(i32, String)],
    /// (cookie, host directory) of each external mount.
    pub mounts: &'a [(String, PathBuf)],
}

/// `criu restore ...` after the program name.
pub fn restore_args(plan: &RestorePlan<'_>) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "restore".into(),
        "--images-dir".into(),
        plan.images.into(),
        "--work-dir".into(),
        plan.work.into(),
        "--log-file".into(),
        RESTORE_LOG.into(),
        "--root".into(),
        plan.root.into(),
        "--pidfile".into(),
        plan.pidfile.into(),
        // CRIU forks the tree and exits; the tree is reparented to the supervisor (a child
        // subreaper), which supervises it as it would a container it started.
        "--restore-detached".into(),
        // The supervisor made the sandbox's cgroup and runs CRIU inside it (and inside a
        // cgroup namespace rooted there), so the restored tree lands where the new sandbox's
        // limits are, whatever the dumped one's cgroup was called.
        "--manage-cgroups=ignore".into(),
        "--link-remap".into(),
        "--file-locks".into(),
    ];
    for (fd, what) in plan.inherit {
        args.push("--inherit-fd".into());
        args.push(format!("fd[{fd}]:{what}").into());
    }
    for (cookie, host) in plan.mounts {
        args.push("--external".into());
        let mut value = OsString::from(format!("mnt[{cookie}]:"));
        value.push(host);
        args.push(value);
    }
    args
}

/// The lines of a CRIU log that say what went wrong, for an error message: its `Error`
/// lines (at most the last 5), else its last 3 lines.
pub fn log_reason(log: &str) -> String {
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Error") && !l.contains("RLIMIT_NOFILE") && !l.contains("FAILED"))
        .map(strip_timestamp)
        .collect();
    let picked: Vec<&str> = if errors.is_empty() {
        let lines: Vec<&str> = log.lines().map(strip_timestamp).collect();
        lines[lines.len().saturating_sub(3)..].to_vec()
    } else {
        errors[errors.len().saturating_sub(5)..].to_vec()
    };
    if picked.is_empty() {
        "criu wrote no log".to_string()
    } else {
        picked.join("; ")
    }
}

/// "(00.071490) Error (criu/x.c:12): msg" -> "Error (criu/x.c:12): msg".
fn strip_timestamp(line: &str) -> &str {
    let line = line.trim();
    match line.strip_prefix('(').and_then(|l| l.split_once(')')) {
        Some((_, rest)) => rest.trim(),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version("Version: 4.1.1\n"), Some((4, 1, 1)));
        assert_eq!(
            parse_version("Version: 3.17.1\nGitID: v3.17\n"),
            Some((3, 17, 1))
        );
        assert_eq!(parse_version("Version: 4.2\n"), Some((4, 2, 0)));
        assert_eq!(parse_version("criu\n"), None);
        assert_eq!(parse_version("Version: x.1\n"), None);
    }

    #[test]
    fn an_old_or_missing_binary_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = dir.path().join("criu");
        std::fs::write(&old, "#!/bin/sh\necho 'Version: 3.17.1'\n").expect("write");
        let exec = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755);
        std::fs::set_permissions(&old, exec).expect("chmod");
        let err = Criu::find(Some(&old)).expect_err("3.17 is too old");
        assert!(err.to_string().contains("is criu 3.17.1"), "{err}");
        let err = Criu::at(&dir.path().join("nope")).expect_err("missing");
        assert!(err.to_string().starts_with("cannot run"), "{err}");
        std::fs::write(&old, "#!/bin/sh\necho 'Version: 4.1.1'\n").expect("write");
        let criu = Criu::find(Some(&old)).expect("4.1.1");
        assert_eq!(criu.version, "4.1.1");
    }

    #[test]
    fn command_lines() {
        let files = vec!["file[18:3]".to_string()];
        let mounts = vec![ExternalMount {
            guest: "/data".into(),
            cookie: "m0".into(),
        }];
        let args = dump_args(&DumpPlan {
            pid: 42,
            images: Path::new("/c/images"),
            work: Path::new("/w"),
            leave_running: true,
            hook: Path::new("/w/hook"),
            external_files: &files,
            mounts: &mounts,
        });
        let text: Vec<String> = args.iter().map(|a| a.to_string_lossy().into()).collect();
        let line = text.join(" ");
        assert!(line.starts_with("dump --tree 42 --images-dir /c/images --work-dir /w"));
        assert!(line.contains("--leave-running"));
        assert!(line.contains("--external file[18:3]"));
        assert!(line.contains("--external mnt[/data]:m0"));
        assert!(line.contains("--action-script /w/hook"));

        let inherit = vec![(3, "pipe:[77]".to_string())];
        let host = vec![("m0".to_string(), PathBuf::from("/srv/data"))];
        let args = restore_args(&RestorePlan {
            images: Path::new("/c/images"),
            work: Path::new("/b"),
            root: Path::new("/b/rootfs"),
            pidfile: Path::new("/b/restored.pid"),
            inherit: &inherit,
            mounts: &host,
        });
        let line: Vec<String> = args.iter().map(|a| a.to_string_lossy().into()).collect();
        let line = line.join(" ");
        assert!(line.contains("--root /b/rootfs"));
        assert!(line.contains("--restore-detached"));
        assert!(line.contains("--manage-cgroups=ignore"));
        assert!(line.contains("--inherit-fd fd[3]:pipe:[77]"));
        assert!(line.contains("--external mnt[m0]:/srv/data"));
    }

    #[test]
    fn log_reasons() {
        let log = "(00.01) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self\n\
                   (00.02) Warn  (x): meh\n\
                   (00.03) Error (criu/files-reg.c:2175): File tmp/held has bad size 132 (expect 57)\n\
                   (00.04) Error (criu/cr-restore.c:2320): Restoring FAILED.\n";
        assert_eq!(
            log_reason(log),
            "Error (criu/files-reg.c:2175): File tmp/held has bad size 132 (expect 57)"
        );
        assert_eq!(log_reason("a\nb\nc\nd\n"), "b; c; d");
        assert_eq!(log_reason(""), "criu wrote no log");
    }
}
