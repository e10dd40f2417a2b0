//! Warm shells: containers made ahead of time for an image, waiting to be claimed by a
//! create of that image (the warm pool). Their number per image is set by `--warm` at start
//! and by pools later ([`Backend::set_warm`]); a refill task keeps each image at its target
//! and ends shells beyond it.

use std::collections::HashSet;

use tracing::info;

use super::*;

/// A warm shell ready to be claimed: its bundle under `<dir>/.warm` and its supervisor.
#[derive(Debug)]
pub(super) struct Shell {
    bundle: PathBuf,
    child: tokio::process::Child,
    /// The supervisor's stdout, which reports the workload's end once claimed.
    reports: Option<tokio::io::BufReader<tokio::process::ChildStdout>>,
    image_id: String,
}

impl Shell {
    /// Whether its supervisor still waits for a claim (reaped here if it has ended).
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Most warm shells of one image.
const MAX_WARM: usize = 1000;

/// How long a woken refill waits before it starts a shell. A hand-out wakes it once its
/// claim is done, while the server still records and answers the create: a new shell's
/// supervisor start (~3 ms of CPU) then competed with that answer on a small machine. 2 ms
/// took ~0.2 ms off a hand-out's p50 from a full pool here, ~0.7 ms off its p90
/// (docs/PERFORMANCE.md). Every refill a notice wakes starts 2 ms later for it.
const REFILL_SETTLE: Duration = Duration::from_millis(2);

impl LinuxBackend {
    /// Sets how many warm shells of `image` (a name in the image store) to keep ready.
    pub(super) fn set_warm_target(&self, image: &str, count: usize) -> Result<(), BackendError> {
        let inner = &self.inner;
        if let Err(reason) = &inner.available {
            return Err(BackendError::Other(format!(
                "the linux backend cannot run here: {reason}"
            )));
        }
        if count > MAX_WARM {
            return Err(BackendError::Invalid(format!(
                "warm: {count} shells of {image:?} is more than {MAX_WARM}"
            )));
        }
        {
            let mut targets = inner
                .targets
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match targets.iter_mut().find(|(name, _)| name == image) {
                Some(t) => t.1 = count,
                None => targets.push((image.to_string(), count)),
            }
        }
        if !inner
            .refilling
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            let runtime = tokio::runtime::Handle::try_current()
                .map_err(|e| BackendError::Other(format!("warm shells need a runtime: {e}")))?;
            runtime.spawn(refill_loop(Arc::downgrade(inner)));
        }
        inner.refill.notify_one();
        Ok(())
    }

    /// Warm shells per image name: (image, ready, target).
    pub(super) fn warm_state(&self) -> Vec<(String, usize, usize)> {
        let inner = &self.inner;
        let targets = inner
            .targets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        targets
            .into_iter()
            .map(|(name, target)| {
                let ready = inner
                    .config
                    .images
                    .resolve(&name)
                    .map(|i| inner.warm_count(&i.id))
                    .unwrap_or(0);
                (name, ready, target)
            })
            .collect()
    }
}

/// What the linux backend's `warren info` detail starts its warm pools with, before
/// [`warren_runtime::format_warm`]'s list: "warm shells: busybox 3/4 ready".
pub const WARM_LABEL: &str = "warm shells: ";

impl Inner {
    /// A ready warm shell of this image, if there is one, and the shells found dead on the
    /// way, for the caller to [`end_shell`].
    pub(super) fn take_shell(&self, image_id: &str) -> (Option<Shell>, Vec<Shell>) {
        let mut shells = self
            .shells
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut dead = Vec::new();
        while let Some(i) = shells.iter().position(|s| s.image_id == image_id) {
            let mut shell = shells.swap_remove(i);
            if shell.alive() {
                // The caller wakes the refill once it is done with the shell (a hand-out's
                // claim should not share the CPUs with a new shell's start).
                return (Some(shell), dead);
            }
            dead.push(shell);
        }
        (None, dead)
    }

    /// Takes the shells whose supervisor has ended (killed by hand or by the OOM killer):
    /// a claim cannot reach them, and the refill replaces them.
    pub(super) fn take_dead_shells(&self) -> Vec<Shell> {
        self.shells
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extract_if(.., |s| !s.alive())
            .collect()
    }

    /// Takes the shells of images other than `current` (the images their pools' names
    /// stand for now): a name imported again stands for another image, whose creates would
    /// never claim them.
    fn take_stale_shells(&self, current: &HashSet<&str>) -> Vec<Shell> {
        self.shells
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extract_if(.., |s| !current.contains(s.image_id.as_str()))
            .collect()
    }

    /// Whether any warm pool is set (even at 0: its shells may still be ending).
    pub(super) fn has_warm_targets(&self) -> bool {
        !self
            .targets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
    }

    /// Live warm shells of this image.
    pub(super) fn warm_count(&self, image_id: &str) -> usize {
        self.shells
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter_mut()
            .filter(|s| s.image_id == image_id)
            .map(Shell::alive)
            .filter(|alive| *alive)
            .count()
    }
}

impl Drop for Inner {
    /// Warm shells belong to this server: they end with it (sandboxes do not).
    fn drop(&mut self) {
        let shells = std::mem::take(
            self.shells
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for shell in &shells {
            if let Some(pid) = shell.child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        for shell in shells {
            let _ = std::fs::remove_dir_all(&shell.bundle);
        }
    }
}

/// Ends a shell nobody claimed (its image has more than its target): the supervisor, its
/// cgroup and its bundle.
async fn end_shell(inner: &Inner, mut shell: Shell) {
    if let Some(pid) = shell.child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(5), shell.child.wait())
        .await
        .is_err()
    {
        let _ = shell.child.start_kill();
        let _ = shell.child.wait().await;
    }
    remove_shell(inner, &shell.bundle);
}

/// Removes what is left of a shell whose supervisor has ended: its processes, its cgroup
/// and its bundle (at `bundle`: where the shell was, or the sandbox's after a claim).
fn remove_shell(inner: &Inner, bundle: &Path) {
    if let (Ok(layout), Ok(state)) = (
        &inner.available,
        config::read_json::<State>(bundle, config::STATE_FILE),
    ) {
        let cg = crate::cgroup::Cgroup::open(layout, &inner.config.cgroup_parent, &state.cgroup);
        let _ = cg.kill_all();
        let _ = cg.remove();
    }
    let _ = std::fs::remove_dir_all(bundle);
}

/// Ends, in the background, shells found dead (see [`Inner::take_shell`]), then wakes the
/// refill.
pub(super) fn end_dead_shells(inner: &Arc<Inner>, dead: Vec<Shell>) {
    if dead.is_empty() {
        return;
    }
    let inner = Arc::clone(inner);
    tokio::spawn(async move {
        end_dead(&inner, dead).await;
        // Replaced now rather than at the refill's next 5 s round.
        inner.refill.notify_one();
    });
}

/// Ends shells whose supervisor had ended, saying so.
async fn end_dead(inner: &Inner, dead: Vec<Shell>) {
    if dead.is_empty() {
        return;
    }
    warn!(
        shells = dead.len(),
        "linux: warm shells whose supervisor had ended were dropped from the pool"
    );
    for shell in dead {
        end_shell(inner, shell).await;
    }
}

/// Removes warm shells a previous server left (killed before it could end them).
pub(super) fn clean_warm_dir(
    warm_dir: &Path,
    layout: &crate::cgroup::CgroupLayout,
    cgroup_parent: &str,
) {
    let Ok(entries) = std::fs::read_dir(warm_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let bundle = entry.path();
        if let Ok(state) = config::read_json::<State>(&bundle, config::STATE_FILE) {
            if state.supervisor_alive() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(state.supervisor_pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let cg = crate::cgroup::Cgroup::open(layout, cgroup_parent, &state.cgroup);
            let _ = cg.kill_all();
            let _ = cg.remove();
        }
        let _ = std::fs::remove_dir_all(&bundle);
    }
}

/// Keeps warm pools at their targets: starts shells until each image has its count and ends
/// those beyond it, then sleeps until one is taken or a target changes (or 5 s, to retry an
/// image that was missing). Ends with the backend.
pub(super) async fn refill_loop(weak: std::sync::Weak<Inner>) {
    let mut reported = std::collections::HashSet::new();
    loop {
        let Some(inner) = weak.upgrade() else { return };
        end_dead(&inner, inner.take_dead_shells()).await;
        let targets = inner
            .targets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut pools = Vec::new();
        for (name, target) in &targets {
            match inner.config.images.resolve(name) {
                Ok(image) => pools.push((name, image, *target)),
                Err(e) => {
                    if reported.insert(name.clone()) {
                        warn!(image = %name, "linux: warm pool waits for its image: {}", crate::error_chain(&e));
                    }
                }
            }
        }
        let current: HashSet<&str> = pools
            .iter()
            .map(|(_, image, _)| image.id.as_str())
            .collect();
        let stale = inner.take_stale_shells(&current);
        if !stale.is_empty() {
            info!(
                shells = stale.len(),
                "linux: warm shells of an image no pool names any more (imported again, or removed) are ended"
            );
        }
        for shell in stale {
            end_shell(&inner, shell).await;
        }
        for (name, image, target) in pools {
            while inner.warm_count(&image.id) < target {
                match start_shell(&inner, &image).await {
                    Ok(shell) => inner
                        .shells
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(shell),
                    Err(e) => {
                        warn!(image = %name, "linux: cannot start a warm shell: {e}");
                        break;
                    }
                }
            }
            let surplus = inner.warm_count(&image.id).saturating_sub(target);
            for _ in 0..surplus {
                let (shell, dead) = inner.take_shell(&image.id);
                for shell in shell.into_iter().chain(dead) {
                    end_shell(&inner, shell).await;
                }
            }
        }
        // Not holding the backend while asleep: dropping it ends the loop.
        let refill = Arc::clone(&inner.refill);
        drop(inner);
        tokio::select! {
            () = refill.notified() => tokio::time::sleep(REFILL_SETTLE).await,
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

static SHELL_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Starts one warm shell of `image` and waits until it is ready.
async fn start_shell(inner: &Inner, image: &warren_image::Image) -> Result<Shell, BackendError> {
    let n = SHELL_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let wid = format!("warm-{}-{n}", std::process::id());
    let bundle = inner.config.dir.join(WARM_DIR).join(&wid);
    let template = ContainerConfig {
        id: wid.clone(),
        layers: image.layers.clone(),
        rootfs: None,
        argv: Vec::new(),
        env: Vec::new(),
        cwd: "/".to_string(),
        hostname: "warm".to_string(),
        uid: 0,
        gid: 0,
        read_only_rootfs: false,
        mounts: Vec::new(),
        deny_syscalls: Vec::new(),
        policy_syscalls: None,
        loopback: true,
        egress: None,
        read_only_paths: Vec::new(),
        masked_paths: Vec::new(),
        writable_paths: Vec::new(),
        exec_allow: None,
        cgroup_parent: inner.config.cgroup_parent.clone(),
        limits: Limits::default(),
        log_max_bytes: inner.config.log_max_bytes,
        stop_grace_ms: inner.config.default_stop_grace.as_millis() as u64,
        timeout_ms: None,
        storage_bytes: None,
    };
    make_bundle(&bundle, &template)?;
    match spawn_supervisor(inner, &bundle, Some("--warm")).await {
        Ok(started) => Ok(Shell {
            bundle,
            child: started.child,
            reports: started.reports,
            image_id: image.id.clone(),
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&bundle);
            Err(e)
        }
    }
}

/// Why a claim failed.
#[derive(Debug)]
pub(super) enum ClaimError {
    /// The shell's supervisor was gone before it got the claim, so nothing of the sandbox
    /// ran; the shell is removed and a cold start can take its place.
    Gone(BackendError),
    /// The claim reached the shell and failed there (a command that does not exist,
    /// limits the cgroup refused...): the create's error.
    Failed(BackendError),
}

/// Hands a warm shell to the sandbox: its bundle becomes the sandbox's, the supervisor gets
/// the configuration and the workload is `execve`d in the prepared container.
pub(super) async fn claim(
    inner: &Inner,
    shell: Shell,
    bundle: &Path,
    container: &ContainerConfig,
) -> Result<Started, ClaimError> {
    use tokio::io::AsyncWriteExt;
    debug!(shell = %shell.bundle.display(), "linux: claiming a warm shell");
    let claim = config::Claim {
        bundle: bundle.to_path_buf(),
        config: container.clone(),
    };
    let mut line = match serde_json::to_string(&claim) {
        Ok(line) => line,
        Err(e) => {
            end_shell(inner, shell).await;
            return Err(ClaimError::Failed(BackendError::Other(format!(
                "encode claim: {e}"
            ))));
        }
    };
    line.push('\n');
    // The supervisor writes the sandbox's `container.json` while its workload starts.
    if let Err(e) = std::fs::rename(&shell.bundle, bundle) {
        end_shell(inner, shell).await;
        return Err(ClaimError::Gone(BackendError::io(
            "rename warm shell to",
            bundle,
            e,
        )));
    }
    let Shell {
        mut child, reports, ..
    } = shell;
    let socket = bundle.join(config::CONTROL_SOCKET);
    let sent = async {
        let mut stream = tokio::net::UnixStream::connect(&socket).await?;
        stream.write_all(line.as_bytes()).await?;
        Ok::<_, std::io::Error>(stream)
    };
    let answered = match sent.await {
        Ok(stream) => {
            let mut reply = String::new();
            tokio::io::BufReader::new(stream)
                .read_line(&mut reply)
                .await
                .map(|_| reply)
        }
        Err(e) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            remove_shell(inner, bundle);
            return Err(ClaimError::Gone(BackendError::io(
                "claim warm shell",
                &socket,
                e,
            )));
        }
    };
    let reply = match answered {
        Ok(reply) => reply,
        Err(e) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(ClaimError::Failed(BackendError::io(
                "claim warm shell",
                &socket,
                e,
            )));
        }
    };
    let reply = reply.trim_end();
    match reply.strip_prefix("ok ").map(str::parse::<i32>) {
        Some(Ok(pid)) => {
            debug!(
                pid,
                warm_shells = inner.shells.lock().map(|s| s.len()).unwrap_or(0),
                "linux: claimed"
            );
            Ok(Started {
                child,
                reports,
                pid,
            })
        }
        _ => {
            let _ = child.wait().await;
            Err(ClaimError::Failed(start_error(reply)))
        }
    }
}
