//! Checkpoint and restore of linux sandboxes with CRIU: the backend's side. The command lines
//! are [`crate::criu`]'s; the restoring supervisor is [`crate::restore`].
//!
//! A checkpoint's payload (the directory the caller hands over):
//! - `linux.json` ([`LinuxCheckpoint`]): the image the sandbox runs, how CRIU saw the
//!   workload's stdio, the bind mounts from the host, CRIU's version, and what confined the
//!   workload ([`Confinement`]: a restore brings that back as it was, so one under a policy
//!   that asks for other confinement is refused);
//! - `images/`: CRIU's images of the process tree and its namespaces (mount, UTS, IPC,
//!   network, pid, cgroup);
//! - `rootfs.tar`: the overlay's upper directory, the sandbox's changes to its image's files
//!   (whiteouts and overlay xattrs included), taken by CRIU's `post-dump` hook while the tree
//!   is still frozen, so it matches the dumped processes' open files even with
//!   `--leave-running`. Absent for a prepared root directory (`spec.image` a path): that is
//!   used in place, so its changes stay where they are;
//! - `container.log`: the output so far, so the restored sandbox's log continues it;
//! - `stdin`: the workload's input file, when it had one.
//!
//! A dump without `leave_running` leaves a `checkpointed` mark in the bundle first: the
//! supervisor records CRIU's kill as the workload's end, and the mark makes that end `Stopped`
//! rather than a SIGKILL exit.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use warren_runtime::CheckpointInfo;
use warren_spec::{SyscallEntry, SyscallPolicy};

use super::*;
use crate::criu::{self, Criu, ExternalMount};
use crate::restore::RestoreSpec;

/// The linux backend's part of a checkpoint's payload.
pub const LINUX_FILE: &str = "linux.json";
pub const IMAGES_DIR: &str = "images";
pub const ROOTFS_TAR: &str = "rootfs.tar";
/// Marks a bundle whose workload CRIU is about to kill after dumping it.
pub const CHECKPOINTED_MARK: &str = "checkpointed";
/// CRIU's working directory during a dump, inside the bundle (its log and stats are not
/// part of the checkpoint).
const DUMP_WORK_DIR: &str = ".dump";
/// How long a dump without `leave_running` waits for the supervisor to record the end.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// What `linux.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LinuxCheckpoint {
    /// The image's id (`sha256:...`); `None` for a prepared root directory.
    pub image: Option<String>,
    /// The sandbox's id when it was dumped.
    pub source_id: String,
    pub criu_version: String,
    /// How CRIU saw the init's stdout, stderr and stdin (`pipe:[INODE]`,
    /// `file[MNT_ID:INODE]`), for the descriptors the supervisor gave it.
    pub stdout: Option<String>,
    pub stderr: Option<String>,
    pub stdin: Option<String>,
    /// Bind mounts from the host, in `container.json`'s order.
    pub mounts: Vec<ExternalMount>,
    /// What confined the workload when it was dumped; `None` in a checkpoint from before
    /// this was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confinement: Option<Confinement>,
}

/// The confinement a workload gets at its start that CRIU restores as it was dumped (the
/// seccomp filter, the masks in its mount namespace, its loopback's state), whatever the
/// restored sandbox's config says. A restore whose config asks for other confinement is
/// refused: the sandbox would run confined otherwise than its policy says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Confinement {
    /// The spec's `denySyscalls`.
    #[serde(default)]
    pub deny_syscalls: Vec<String>,
    /// The policy's `syscalls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syscalls: Option<SyscallPolicy>,
    pub loopback: bool,
    #[serde(default)]
    pub masked_paths: Vec<String>,
}

impl Confinement {
    pub fn of(container: &ContainerConfig) -> Confinement {
        Confinement {
            deny_syscalls: container.deny_syscalls.clone(),
            syscalls: container
                .policy_syscalls
                .as_ref()
                .map(|p| p.syscalls.clone()),
            loopback: container.loopback,
            masked_paths: container.masked_paths.clone(),
        }
    }

    /// How `now` (the restored sandbox's config) differs from `self` (the checkpointed
    /// workload's), one phrase each; empty when they agree.
    fn differences(&self, now: &Confinement) -> Vec<String> {
        let mut out = Vec::new();
        changes(
            &mut out,
            (&self.denied(), &now.denied()),
            "the policy now denies syscalls the checkpointed workload was not confined by",
            "the checkpointed workload was denied syscalls the policy no longer denies (CRIU \
             restores its filter as it was)",
        );
        let allowed = |c: &Confinement| {
            let list = c.syscalls.as_ref()?.allow.as_ref()?;
            Some(list.iter().map(entry).collect::<BTreeSet<_>>())
        };
        match (allowed(self), allowed(now)) {
            (None, None) => {}
            (None, Some(_)) => out.push(
                "the policy now allows only the syscalls it lists (syscalls.allow); the \
                 checkpointed workload was not confined by such a list"
                    .to_string(),
            ),
            (Some(_), None) => out.push(
                "the checkpointed workload was allowed only the syscalls its policy listed \
                 (syscalls.allow); the policy now has no such list"
                    .to_string(),
            ),
            (Some(was), Some(is)) if was != is => out.push(format!(
                "the policy's syscalls.allow differs from the checkpointed workload's (only \
                 now: {}; only then: {})",
                or_none(list(is.difference(&was))),
                or_none(list(was.difference(&is)))
            )),
            (Some(_), Some(_)) => {}
        }
        let masked = |c: &Confinement| c.masked_paths.iter().cloned().collect::<BTreeSet<_>>();
        changes(
            &mut out,
            (&masked(self), &masked(now)),
            "the policy now masks paths the checkpointed workload was not confined by",
            "the checkpointed workload had paths masked that the policy no longer masks (CRIU \
             restores its mounts as they were)",
        );
        match (self.loopback, now.loopback) {
            (true, false) => out.push(
                "the policy's network.mode is now none, but the checkpointed workload's \
                 loopback was up (CRIU restores its network as it was)"
                    .to_string(),
            ),
            (false, true) => out.push(
                "the checkpointed workload's loopback was down (network.mode none), and the \
                 policy's network.mode is no longer none (CRIU restores its network as it was)"
                    .to_string(),
            ),
            _ => {}
        }
        out
    }

    /// Every denied syscall, the spec's and the policy's, as [`entry`] names it.
    fn denied(&self) -> BTreeSet<String> {
        let policy = self.syscalls.iter().flat_map(|s| s.deny.iter().flatten());
        self.deny_syscalls
            .iter()
            .cloned()
            .chain(policy.map(entry))
            .collect()
    }
}

/// Says what `now` has that `was` lacks (`added: ...`) and the other way round.
fn changes(
    out: &mut Vec<String>,
    (was, now): (&BTreeSet<String>, &BTreeSet<String>),
    added: &str,
    removed: &str,
) {
    for (what, items) in [(added, now.difference(was)), (removed, was.difference(now))] {
        let items = list(items);
        if !items.is_empty() {
            out.push(format!("{what}: {items}"));
        }
    }
}

/// A syscall entry by its name, with its conditions when it has any.
fn entry(e: &SyscallEntry) -> String {
    match e.args() {
        [] => e.name().to_string(),
        args => format!(
            "{} (when {})",
            e.name(),
            serde_json::to_string(args).unwrap_or_default()
        ),
    }
}

fn list<'a>(items: impl Iterator<Item = &'a String>) -> String {
    items.map(String::as_str).collect::<Vec<_>>().join(", ")
}

fn or_none(s: String) -> String {
    if s.is_empty() { "none".to_string() } else { s }
}

impl Inner {
    /// The CRIU binary, found once.
    fn criu(&self) -> Result<Criu, BackendError> {
        if let Some(criu) = self.criu.get() {
            return Ok(criu.clone());
        }
        let criu = Criu::find(self.config.criu.as_deref())
            .map_err(|e| BackendError::Other(crate::error_chain(&e)))?;
        Ok(self.criu.get_or_init(|| criu).clone())
    }
}

pub(super) async fn checkpoint(
    backend: &LinuxBackend,
    config: &SandboxConfig,
    dir: &Path,
    leave_running: bool,
) -> Result<CheckpointInfo, BackendError> {
    let inner = &backend.inner;
    let id = &config.id;
    let (pid, done) = {
        let sandboxes = inner.lock();
        let sb = sandboxes.get(id).ok_or_else(|| not_found(id))?;
        let pid = sb.info.get("pid").and_then(|p| p.parse::<i32>().ok());
        match (&sb.status, pid) {
            (BackendStatus::Running, Some(pid)) => (pid, sb.done.clone()),
            (status, _) => {
                return Err(BackendError::Invalid(format!(
                    "sandbox {id} is {status:?}, not Running: there is no process to checkpoint"
                )));
            }
        }
    };
    let bundle = backend.bundle(id);
    let container: ContainerConfig = config::read_json(&bundle, config::CONFIG_FILE)
        .map_err(|e| BackendError::io("read", &bundle.join(config::CONFIG_FILE), e))?;
    if let Some(why) = not_restorable(&container) {
        return Err(BackendError::Invalid(format!(
            "sandbox {id}: {why}; checkpoints of such sandboxes are not supported"
        )));
    }
    let foreign = outside_tree(&cgroup_pids(inner, &bundle, id)?, pid, |p| {
        crate::restore::parent_of(nix::unistd::Pid::from_raw(p))
    });
    if !foreign.is_empty() {
        let pids: Vec<String> = foreign.iter().map(i32::to_string).collect();
        return Err(BackendError::Invalid(format!(
            "sandbox {id} has processes started by warren exec (pids {}); a checkpoint would \
             drop them: wait for them to end",
            pids.join(", ")
        )));
    }
    let criu = inner.criu()?;
    let image = image_of(inner, config, &container)?;
    let stdio = stdio_of(pid)
        .map_err(|e| BackendError::io("inspect the workload's descriptors", &bundle, e))?;
    let mounts: Vec<ExternalMount> = container
        .mounts
        .iter()
        .enumerate()
        .map(|(i, m)| ExternalMount {
            guest: m.guest.clone(),
            cookie: format!("m{i}"),
        })
        .collect();

    let work = bundle.join(DUMP_WORK_DIR);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir(&work).map_err(|e| BackendError::io("create", &work, e))?;
    let images = dir.join(IMAGES_DIR);
    std::fs::create_dir(&images).map_err(|e| BackendError::io("create", &images, e))?;
    let hook = work.join("post-dump.sh");
    let script = hook_script(&bundle, dir, container.rootfs.is_none());
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .open(&hook)
        .and_then(|mut f| std::io::Write::write_all(&mut f, script.as_bytes()))
        .map_err(|e| BackendError::io("write", &hook, e))?;
    let mark = bundle.join(CHECKPOINTED_MARK);
    if !leave_running {
        std::fs::write(&mark, b"").map_err(|e| BackendError::io("write", &mark, e))?;
    }
    let external_files: Vec<String> = stdio
        .external_files()
        .into_iter()
        .map(str::to_string)
        .collect();
    let args = criu::dump_args(&criu::DumpPlan {
        pid,
        images: &images,
        work: &work,
        leave_running,
        hook: &hook,
        external_files: &external_files,
        mounts: &mounts,
    });
    let status = tokio::process::Command::new(&criu.path)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map_err(|e| BackendError::io("run", &criu.path, e));
    let log_path = work.join(criu::DUMP_LOG);
    let failed = match status {
        Ok(s) if s.success() => None,
        Ok(_) => {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            // Kept for a look: the work dir goes below.
            let kept = bundle.join("checkpoint-dump.log");
            let _ = std::fs::rename(&log_path, &kept);
            Some(BackendError::Other(crate::error_chain(
                &criu::CriuError::Failed {
                    action: "dump",
                    reason: criu::log_reason(&log),
                    log: kept.display().to_string(),
                },
            )))
        }
        Err(e) => Some(e),
    };
    let _ = std::fs::remove_dir_all(&work);
    if let Some(e) = failed {
        // The tree runs on (CRIU resumes it when a dump fails).
        let _ = std::fs::remove_file(&mark);
        return Err(e);
    }
    if !leave_running && let Some(mut done) = done {
        // CRIU killed the tree; the supervisor drains its output and records the end.
        if tokio::time::timeout(STOP_WAIT, done.wait_for(|d| *d))
            .await
            .is_err()
        {
            warn!(id, "linux: the supervisor did not end after the checkpoint");
        }
    }
    let given = bundle.join(config::STDIN_FILE);
    if given.exists() {
        std::fs::copy(&given, dir.join(config::STDIN_FILE))
            .map_err(|e| BackendError::io("copy", &given, e))?;
    }
    let saved = LinuxCheckpoint {
        image: image.clone(),
        source_id: id.clone(),
        criu_version: criu.version.clone(),
        stdout: stdio.stdout,
        stderr: stdio.stderr,
        stdin: stdio.stdin,
        mounts,
        confinement: Some(Confinement::of(&container)),
    };
    config::write_json(dir, LINUX_FILE, &saved)
        .map_err(|e| BackendError::io("write", &dir.join(LINUX_FILE), e))?;
    let mut info = CheckpointInfo::new();
    info.insert("engine".into(), "criu".into());
    info.insert("criuVersion".into(), criu.version.clone());
    if let Some(image) = image {
        info.insert("image".into(), image);
    }
    Ok(info)
}

/// The processes in the sandbox's cgroup.
fn cgroup_pids(inner: &Inner, bundle: &Path, id: &str) -> Result<Vec<i32>, BackendError> {
    let Some(cgroup) = inner.cgroup(&cgroup_name(bundle, id)) else {
        return Ok(Vec::new());
    };
    cgroup.pids().map_err(|e| {
        BackendError::Other(format!(
            "list the processes of sandbox {id}: {}",
            crate::error_chain(&e)
        ))
    })
}

/// The processes of `pids` (a cgroup's) that are neither `init` nor below it, by `parent`
/// (`None`: the process has ended). CRIU dumps the init's tree only: these are what
/// `warren exec` started (its helper joins the cgroup from outside the tree, and what it
/// starts is the helper's child). A process whose chain of parents breaks because one ended
/// meanwhile is left out: it is being reparented into the tree.
fn outside_tree(pids: &[i32], init: i32, parent: impl Fn(i32) -> Option<i32>) -> Vec<i32> {
    let members: HashSet<i32> = pids.iter().copied().collect();
    let parents: HashMap<i32, Option<i32>> = pids.iter().map(|&p| (p, parent(p))).collect();
    let below_init = |pid: i32| {
        let mut at = pid;
        // A chain inside the cgroup has at most as many links as the cgroup has processes.
        for _ in 0..=pids.len() {
            if at == init {
                return true;
            }
            match parents.get(&at) {
                Some(Some(up)) if *up == init || members.contains(up) => at = *up,
                Some(None) => return true,
                _ => return false,
            }
        }
        false
    };
    pids.iter().copied().filter(|&p| !below_init(p)).collect()
}

/// The image the sandbox runs: the one its spec names, if that still has the layers the
/// container was made of (`None` for a prepared root directory).
fn image_of(
    inner: &Inner,
    config: &SandboxConfig,
    container: &ContainerConfig,
) -> Result<Option<String>, BackendError> {
    if container.rootfs.is_some() {
        return Ok(None);
    }
    let name = config.spec.image.as_deref().unwrap_or_default();
    match RootSource::of(inner, name, None)? {
        RootSource::Image(image) if image.layers == container.layers => Ok(Some(image.id)),
        RootSource::Image(image) => Err(BackendError::Invalid(format!(
            "spec.image: {name:?} now names image {}, not the one sandbox {} runs; \
             checkpoint it before re-tagging its image",
            image.id, config.id
        ))),
        RootSource::Dir(_) => Ok(None),
    }
}

/// The init's stdio as CRIU names them, for the descriptors that came from outside the
/// container (the supervisor's pipes, the host's `/dev/null` or input file).
#[derive(Debug, Default)]
struct StdioKeys {
    stdout: Option<String>,
    stderr: Option<String>,
    stdin: Option<String>,
}

impl StdioKeys {
    /// The files CRIU must dump as external (pipes need no flag).
    fn external_files(&self) -> Vec<&str> {
        let mut files: Vec<&str> = [&self.stdin, &self.stdout, &self.stderr]
            .into_iter()
            .flatten()
            .filter(|k| k.starts_with("file["))
            .map(String::as_str)
            .collect();
        files.dedup();
        files
    }
}

fn stdio_of(pid: i32) -> std::io::Result<StdioKeys> {
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    let inside = mount_ids(&mountinfo);
    let key = |fd: i32| -> std::io::Result<Option<String>> {
        let link = match std::fs::read_link(format!("/proc/{pid}/fd/{fd}")) {
            Ok(link) => link,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let link = link.to_string_lossy().into_owned();
        if link.starts_with("pipe:[") {
            return Ok(Some(link));
        }
        let fdinfo = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))?;
        let Some(mnt_id) = fdinfo_mnt_id(&fdinfo) else {
            return Ok(None);
        };
        if inside.contains(&mnt_id) {
            return Ok(None);
        }
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(format!(
            "/proc/{pid}/fd/{fd}"
        ))?);
        Ok(Some(format!("file[{mnt_id:x}:{ino:x}]")))
    };
    Ok(StdioKeys {
        stdin: key(0)?,
        stdout: key(1)?,
        stderr: key(2)?,
    })
}

/// The mount ids (first field) of a `mountinfo` file.
fn mount_ids(mountinfo: &str) -> std::collections::HashSet<u64> {
    mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

fn fdinfo_mnt_id(fdinfo: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// CRIU's `post-dump` action: copies the upper directory and the log while the tree is
/// frozen. A failing hook fails the dump and leaves the tree running.
fn hook_script(bundle: &Path, dir: &Path, with_upper: bool) -> String {
    let q = |p: &Path| sh_quote(&p.display().to_string());
    let mut script = String::from(
        "#!/bin/sh\n# warren: run by CRIU while the dumped tree is frozen.\n\
         [ \"$CRTOOLS_SCRIPT_ACTION\" = post-dump ] || exit 0\nset -e\n",
    );
    if with_upper {
        script.push_str(&format!(
            "tar --create --file {} --directory {} --xattrs --xattrs-include='*' \
             --numeric-owner --sparse .\n",
            q(&dir.join(ROOTFS_TAR)),
            q(&bundle.join(config::UPPER_DIR)),
        ));
    }
    let log = q(&bundle.join(config::LOG_FILE));
    script.push_str(&format!(
        "if [ -f {log} ]; then cp {log} {}; fi\n",
        q(&dir.join(config::LOG_FILE))
    ));
    script
}

/// `s` in single quotes for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

pub(super) async fn restore(
    backend: &LinuxBackend,
    config: &SandboxConfig,
    dir: &Path,
) -> Result<BackendInfo, BackendError> {
    let inner = Arc::clone(&backend.inner);
    let id = &config.id;
    if inner.lock().contains_key(id) {
        return Err(BackendError::AlreadyExists {
            backend: BackendKind::Linux,
            id: id.clone(),
        });
    }
    let (saved, criu, container, image_id) = prepare(&inner, config, dir)?;
    let bundle = backend.bundle(id);
    let started = async {
        let ports = super::ports::bind(&config.spec.ports)?;
        make_bundle(&bundle, &container)?;
        let timeout = inner.config.restore_timeout;
        fill_bundle(dir, &bundle, &container, &saved, &criu, timeout).await?;
        let started = spawn_supervisor(&inner, &bundle, Some("--restore")).await?;
        Ok::<_, BackendError>((started, ports))
    }
    .await;
    let (started, ports) = match started {
        Ok(started) => started,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&bundle);
            inner.network.release(id);
            return Err(e);
        }
    };
    let info = base_info(&image_id, &bundle, &container);
    inner.lock().insert(
        id.clone(),
        Sandbox {
            resources: config.resources.clone(),
            info: info.clone(),
            status: BackendStatus::Created,
            supervisor: None,
            done: None,
            pending: None,
            published: None,
        },
    );
    supervise_child(&inner, id, bundle, started, ports);
    Ok(backend.info(id).unwrap_or(info))
}

/// Why a sandbox of `container` cannot come back from a checkpoint, if it cannot. CRIU
/// cannot restore a seccomp user-notification listener (the exec gate) nor a veth pair whose
/// host end the supervisor owns (egress); it binds the overlay it is given read-write as the
/// root, so the read-only remounts of the root and of paths below it (`--read-only`, a
/// policy's `filesystem.readOnly` and `filesystem.writable`) come back writable; and
/// checkpoints do not save a storage limit's file system: such a sandbox is neither
/// checkpointed nor restored, rather than run less confined than its spec and policy say.
fn not_restorable(container: &ContainerConfig) -> Option<&'static str> {
    let root_writable = container
        .writable_paths
        .iter()
        .any(|p| p.trim_matches('/').is_empty());
    if container.read_only_rootfs
        || !container.read_only_paths.is_empty()
        || (!container.writable_paths.is_empty() && !root_writable)
    {
        Some(
            "its read-only root/paths would come back writable (CRIU restores the root \
             read-write)",
        )
    } else if container.exec_allow.is_some() {
        Some("its policy has an exec list (enforced by a seccomp listener CRIU cannot restore)")
    } else if container.egress.is_some() {
        Some("its policy's network.mode is egress (a veth pair CRIU cannot restore)")
    } else if container.storage_bytes.is_some() {
        Some(
            "it has a storage limit (its writable layer is a file system of its own, which \
             checkpoints do not save yet)",
        )
    } else {
        None
    }
}

/// What a restore of the checkpoint in `dir` needs, checked: its `linux.json`, CRIU, and
/// the container's config (its image by the id the checkpoint recorded, its host paths where
/// they lead now, its egress block taken, which the caller gives back on failure).
fn prepare(
    inner: &Arc<Inner>,
    config: &SandboxConfig,
    dir: &Path,
) -> Result<(LinuxCheckpoint, Criu, ContainerConfig, String), BackendError> {
    let saved: LinuxCheckpoint = config::read_json(dir, LINUX_FILE)
        .map_err(|e| BackendError::Invalid(format!("checkpoint: {LINUX_FILE}: {e}")))?;
    let criu = inner.criu()?;
    // The image by the id the checkpoint recorded: its name may mean another image here.
    let mut by_id = config.clone();
    if let Some(image) = &saved.image {
        by_id.spec.image = Some(image.clone());
    }
    let (container, image_id) = container_config(inner, &by_id).map_err(|e| match (e, &saved.image) {
        (BackendError::Invalid(msg), Some(image)) if msg.starts_with("spec.image") => {
            BackendError::Invalid(format!(
                "{msg}: the checkpoint runs image {image} ({}); import or pull it on this server first",
                config.spec.image.as_deref().unwrap_or("unnamed")
            ))
        }
        (e, _) => e,
    })?;
    // The policy that applies now is the one the restored sandbox must keep.
    if let Some(why) = not_restorable(&container) {
        inner.network.release(&config.id);
        let fix = if container.read_only_rootfs {
            "its spec asks for a read-only root (readOnlyRootfs), so this checkpoint cannot be \
             restored"
        } else {
            "restore it under a policy without it"
        };
        return Err(BackendError::Invalid(format!(
            "restore: {why}; a restored sandbox cannot have that: {fix}"
        )));
    }
    // Nor can a restore change the confinement CRIU brings back as it was dumped.
    // One taken before this was recorded cannot be checked, and CRIU would bring back the
    // capabilities of its day (CAP_MKNOD among them, dropped since): refused.
    let Some(was) = saved.confinement.clone() else {
        inner.network.release(&config.id);
        return Err(BackendError::Invalid(
            "restore: this checkpoint was taken by an older warren, which did not record what \
             confined its workload (its capabilities among it, CAP_MKNOD since dropped); take \
             it again"
                .into(),
        ));
    };
    let differences = was.differences(&Confinement::of(&container));
    if !differences.is_empty() {
        inner.network.release(&config.id);
        return Err(BackendError::Invalid(format!(
            "restore: {}; restore refused (it runs under the policy that applies now, which \
             must confine it as the checkpointed workload was)",
            differences.join("; ")
        )));
    }
    if container.mounts.len() != saved.mounts.len() {
        inner.network.release(&config.id);
        return Err(BackendError::Invalid(format!(
            "checkpoint: {LINUX_FILE} lists {} bind mounts, the spec {}",
            saved.mounts.len(),
            container.mounts.len()
        )));
    }
    Ok((saved, criu, container, image_id))
}

/// [`prepare`] alone, giving back what it took: what would make a restore fail at once.
pub(super) fn check_restore(
    backend: &LinuxBackend,
    config: &SandboxConfig,
    dir: &Path,
) -> Result<(), BackendError> {
    prepare(&backend.inner, config, dir)?;
    backend.inner.network.release(&config.id);
    Ok(())
}

/// Puts the checkpoint's files where the restoring supervisor expects them.
async fn fill_bundle(
    dir: &Path,
    bundle: &Path,
    container: &ContainerConfig,
    saved: &LinuxCheckpoint,
    criu: &Criu,
    timeout: Duration,
) -> Result<(), BackendError> {
    let tar = dir.join(ROOTFS_TAR);
    if container.rootfs.is_none() && tar.exists() {
        let upper = bundle.join(config::UPPER_DIR);
        let mut unpack = tokio::process::Command::new("tar");
        unpack
            .arg("--extract")
            .arg("--file")
            .arg(&tar)
            .arg("--directory")
            .arg(&upper)
            .args([
                "--xattrs",
                "--xattrs-include=*",
                "--numeric-owner",
                "--same-permissions",
                "--same-owner",
            ]);
        super::run_tool(unpack, ("run tar to unpack", &tar), || {
            format!("unpack {} into {}", tar.display(), upper.display())
        })
        .await?;
    }
    for file in [config::LOG_FILE, config::STDIN_FILE] {
        let from = dir.join(file);
        if from.exists() {
            std::fs::copy(&from, bundle.join(file))
                .map_err(|e| BackendError::io("copy", &from, e))?;
        }
    }
    let images = std::fs::canonicalize(dir.join(IMAGES_DIR))
        .map_err(|e| BackendError::io("find", &dir.join(IMAGES_DIR), e))?;
    let spec = RestoreSpec {
        criu: criu.path.clone(),
        images,
        stdout: saved.stdout.clone(),
        stderr: saved.stderr.clone(),
        stdin: saved.stdin.clone(),
        mounts: saved
            .mounts
            .iter()
            .zip(&container.mounts)
            .map(|(m, host)| (m.cookie.clone(), host.host.clone()))
            .collect(),
        timeout_ms: Some(timeout.as_millis().try_into().unwrap_or(u64::MAX)),
    };
    config::write_json(bundle, crate::restore::SPEC_FILE, &spec)
        .map_err(|e| BackendError::io("write", &bundle.join(crate::restore::SPEC_FILE), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(extra: serde_json::Value) -> ContainerConfig {
        let mut c = serde_json::json!({
            "id": "t", "layers": [], "argv": ["sh"], "env": [], "cwd": "/",
            "hostname": "t", "uid": 0, "gid": 0, "cgroupParent": "p", "stopGraceMs": 1,
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        serde_json::from_value(c).unwrap()
    }

    #[test]
    fn read_only_roots_and_paths_are_not_restorable() {
        assert_eq!(not_restorable(&container(serde_json::json!({}))), None);
        for extra in [
            serde_json::json!({"readOnlyRootfs": true}),
            serde_json::json!({"readOnlyPaths": ["/etc"]}),
            serde_json::json!({"writablePaths": ["/tmp"]}),
        ] {
            let why = not_restorable(&container(extra.clone()));
            assert!(
                why.is_some_and(|w| w.contains("would come back writable")),
                "{extra}"
            );
        }
        // `writable: [/]` leaves the root as it is.
        let all = container(serde_json::json!({"writablePaths": ["/", "/tmp"]}));
        assert_eq!(not_restorable(&all), None);
    }

    #[test]
    fn processes_outside_the_inits_tree_are_found() {
        let parents: HashMap<i32, i32> = [
            (100, 9),
            (101, 100),
            (102, 101),
            (200, 50),
            (201, 200),
            (103, 300),
        ]
        .into();
        let pids = [100, 101, 102, 103, 200, 201, 300];
        // 300 has ended: what hung below it is being reparented.
        let found = outside_tree(&pids, 100, |p| parents.get(&p).copied());
        assert_eq!(found, vec![200, 201]);
        assert!(outside_tree(&[100, 101, 102], 100, |p| parents.get(&p).copied()).is_empty());
        // A cycle (pids reused meanwhile) ends the walk.
        let cycle: HashMap<i32, i32> = [(5, 6), (6, 5)].into();
        assert_eq!(
            outside_tree(&[1, 5, 6], 1, |p| cycle.get(&p).copied()),
            [5, 6]
        );
    }

    #[test]
    fn confinement_differences_name_what_differs() {
        let plain = Confinement::of(&container(serde_json::json!({})));
        assert!(plain.differences(&plain).is_empty());
        let strict = Confinement::of(&container(serde_json::json!({
            "policySyscalls": {"hash": "h", "syscalls": {"deny": ["getcwd"]}},
            "maskedPaths": ["/secret"],
            "loopback": false,
        })));
        assert!(strict.differences(&strict).is_empty());
        let d = plain.differences(&strict);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(
            d[0].contains("now denies syscalls") && d[0].ends_with(": getcwd"),
            "{d:?}"
        );
        assert!(
            d[1].contains("now masks paths") && d[1].ends_with(": /secret"),
            "{d:?}"
        );
        assert!(d[2].contains("network.mode is now none"), "{d:?}");
        let d = strict.differences(&plain);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(
            d[0].contains("no longer denies") && d[0].ends_with(": getcwd"),
            "{d:?}"
        );
        // The spec's own list and a policy's denying the same syscall confine alike.
        let by_spec = Confinement::of(&container(serde_json::json!({
            "denySyscalls": ["getcwd"], "maskedPaths": ["/secret"], "loopback": false,
        })));
        assert!(by_spec.differences(&strict).is_empty());
        // Conditions on a syscall's arguments count.
        let rule = Confinement::of(&container(serde_json::json!({
            "policySyscalls": {"hash": "h", "syscalls": {"deny": [
                {"name": "getcwd", "args": [{"index": 0, "op": "eq", "value": 0}]}
            ]}},
            "maskedPaths": ["/secret"], "loopback": false,
        })));
        assert_eq!(strict.differences(&rule).len(), 2);
        let allow = Confinement::of(&container(serde_json::json!({
            "policySyscalls": {"hash": "h", "syscalls": {"allow": ["read", "write"]}},
        })));
        let d = plain.differences(&allow);
        assert!(d.len() == 1 && d[0].contains("syscalls.allow"), "{d:?}");
    }

    #[test]
    fn stdio_keys_name_external_files_once() {
        let keys = StdioKeys {
            stdin: Some("file[18:3]".into()),
            stdout: Some("pipe:[12]".into()),
            stderr: Some("pipe:[13]".into()),
        };
        assert_eq!(keys.external_files(), vec!["file[18:3]"]);
        let keys = StdioKeys {
            stdin: Some("file[18:3]".into()),
            stdout: Some("file[18:3]".into()),
            stderr: None,
        };
        assert_eq!(keys.external_files(), vec!["file[18:3]"]);
    }

    #[test]
    fn mountinfo_and_fdinfo() {
        let info =
            "129 125 0:46 / / rw - overlay overlay rw\n131 129 0:54 / /proc rw - proc proc rw\n";
        let ids = mount_ids(info);
        assert!(ids.contains(&129) && ids.contains(&131) && ids.len() == 2);
        assert_eq!(
            fdinfo_mnt_id("pos:\t0\nflags:\t0100000\nmnt_id:\t24\n"),
            Some(24)
        );
        assert_eq!(fdinfo_mnt_id("pos:\t0\n"), None);
    }

    #[test]
    fn the_hook_quotes_its_paths() {
        let s = hook_script(Path::new("/b/it's"), Path::new("/c"), true);
        assert!(s.contains("--directory '/b/it'\\''s/upper'"), "{s}");
        assert!(s.contains("post-dump"));
        let s = hook_script(Path::new("/b"), Path::new("/c"), false);
        assert!(!s.contains("tar"), "{s}");
        assert!(
            s.contains("cp '/b/container.log' '/c/container.log'"),
            "{s}"
        );
    }
}
