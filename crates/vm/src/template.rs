//! Templates and clones: a VM booted once and saved, then restored many times.
//!
//! A template is a VM of one shape (vCPUs, memory, and an image sandbox's image disk) booted
//! with its RAM in a file on a shared-memory file system (`share=on`), left idle with its
//! guest waiting for a host, paused and saved with qemu's `x-ignore-shared` capability: the
//! device state goes to a small file and the RAM stays in its file, not copied. A clone is
//! qemu started with the same devices, the same RAM file mapped private (`share=off`:
//! copy-on-write, so clones share every page they do not write), and `-incoming defer`;
//! restoring it reads only the device state, so it answers in tens of milliseconds even
//! under TCG.
//!
//! An image sandbox's clone comes from a template of its image: the image's disk (read-only,
//! shared by every VM of the image: see `image`) is attached to the template as it is to a
//! cold boot, so a clone restores the same devices, and its guest mounts the disk as its root
//! at `Start`, as a cold-booted one does (a pool clone during its warm-up: see `warm`). The
//! template's guest has not mounted it.
//!
//! Every clone starts with the template's memory: its hostname and the kernel's RNG state.
//! `Prepare` gives each its own hostname and id and reseeds its CRNG from the host's
//! entropy before anything runs in it.
//!
//! Templates are keyed by everything that shapes the saved state (qemu, kernel, initramfs,
//! shape, acceleration, machine, kernel parameters), so a changed asset makes a new one.
//! They are made on first use of a shape (that create boots cold) or ahead of time by
//! `warren vm template build`. A pool of restored clones per template makes a create a
//! hand-out: the clone's directory is renamed to the sandbox's and qemu moved into its
//! cgroup (while its guest is prepared and started: see `monitor::launch`).

use std::collections::{HashMap, HashSet};
use std::os::unix::ffi::OsStringExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use serde_json::json;
use sha2::Digest as _;
use tracing::{debug, info, warn};
use warren_runtime::BackendError;

use crate::backend::{Inner, POOL_DIR, VmBackendConfig};
use crate::qemu::{self, MemoryFile};
use crate::qmp::Qmp;
use crate::vm::{self, Booted, QemuProcess, QemuRef};

/// Saved device state, beside the RAM file, in a template's directory.
const STATE: &str = "state";
const RAM: &str = "ram";
/// A pool clone's identity file (its qemu, to kill a leftover after a crash).
const POOL_STATE: &str = "pool.json";
/// In a template being built: its qemu and the server building it, so that a later server
/// ends a build whose server was killed (`clean_builds`).
const BUILD_STATE: &str = "build.json";
/// In a template of an image's sandboxes: the path of the image's disk, so the template
/// goes when the image does ([`forget_disks`]).
const DISK: &str = "disk";
/// How long one QMP answer (and a restore's incoming migration) may take: generous, as a
/// loaded host under TCG is slow, and a failed restore falls back to a slower cold boot.
const QMP_PATIENCE: Duration = Duration::from_secs(30);

/// What a template's saved state is made for: the VM's size and its devices.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Shape {
    pub vcpus: u32,
    pub memory_mb: u64,
    /// An image sandbox's root disk (the image's, shared read-only).
    pub root_disk: Option<PathBuf>,
}

impl Shape {
    fn machine<'a>(&'a self, inner: &'a Inner) -> qemu::Machine<'a> {
        let mut machine = inner.machine(self.vcpus, self.memory_mb);
        machine.root_disk = self.root_disk.as_deref();
        machine
    }
}

#[derive(Debug)]
pub struct Templates {
    root: PathBuf,
    pool_dir: PathBuf,
    enabled: bool,
    target: usize,
    state: Mutex<State>,
    refill: Arc<tokio::sync::Notify>,
    /// The server is stopping: no more pool clones.
    stopped: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    building: HashSet<Shape>,
    /// Shapes whose template failed to build (not retried until restart), with why.
    failed: HashMap<Shape, String>,
    /// Shapes used since start: the pool keeps clones of these ready.
    wanted: HashSet<Shape>,
    /// Clones to keep ready of an image's sandboxes (`--warm vm:IMAGE=N`, pools), by the
    /// image's name: its template is built ahead of its first create.
    warm: std::collections::BTreeMap<String, usize>,
    /// The shape each warm image's sandboxes get (its disk found by the refill).
    warm_shapes: HashMap<String, Shape>,
    pool: Vec<Clone>,
    seq: u64,
}

#[derive(Debug)]
struct Clone {
    shape: Shape,
    dir: PathBuf,
    booted: Booted,
}

impl State {
    /// Live pool clones, of `shape` or all (one whose qemu has ended is not counted).
    fn ready(&mut self, shape: Option<&Shape>) -> usize {
        self.pool
            .iter_mut()
            .filter(|c| shape.is_none_or(|s| c.shape == *s))
            .map(|c| c.booted.qemu.running())
            .filter(|alive| *alive)
            .count()
    }

    /// Takes the pool clones whose qemu has ended (killed by hand, by the OOM killer):
    /// nothing can be handed out of them, and the refill replaces them.
    fn take_dead(&mut self) -> Vec<Clone> {
        self.pool
            .extract_if(.., |c| !c.booted.qemu.running())
            .collect()
    }
}

impl Clone {
    /// Kills its qemu and removes its directory.
    async fn end(mut self) {
        self.booted.qemu.kill_and_wait(Duration::from_secs(5)).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Templates {
    pub(crate) fn new(config: &VmBackendConfig) -> Templates {
        Templates {
            root: config.vm.vm.template_dir.clone(),
            pool_dir: config.dir.join(POOL_DIR),
            enabled: config.vm.vm.templates,
            target: config.vm.vm.pool,
            state: Mutex::new(State::default()),
            refill: Arc::new(tokio::sync::Notify::new()),
            stopped: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Clones ready now, for tests and `warren info`.
    pub fn pooled(&self) -> usize {
        self.lock().ready(None)
    }

    /// For `warren info`: "templates off", or the clones ready and what the pool keeps
    /// (then "; warm: busybox 1/2 ready, ..." for images kept warm).
    pub fn summary(&self) -> String {
        if !self.enabled {
            return "templates off".to_string();
        }
        let summary = {
            let mut state = self.lock();
            pool_summary(state.ready(None), self.target, state.wanted.len())
        };
        let warm = self.warm();
        if warm.is_empty() {
            summary
        } else {
            format!(
                "{summary}; {WARM_LABEL}{}",
                warren_runtime::format_warm(&warm)
            )
        }
    }

    /// Sets how many clones of `image`'s sandboxes to keep ready (0: none).
    pub(crate) fn set_warm(&self, image: &str, count: usize) -> Result<(), BackendError> {
        if !self.enabled {
            return Err(BackendError::Invalid(format!(
                "warm {image}: the vm backend's templates are off (vm.templates in its config)"
            )));
        }
        if count > MAX_WARM {
            return Err(BackendError::Invalid(format!(
                "warm {image}: {count} clones is more than {MAX_WARM}"
            )));
        }
        {
            let mut state = self.lock();
            if count == 0 {
                state.warm.remove(image);
            } else {
                state.warm.insert(image.to_string(), count);
            }
        }
        self.refill.notify_one();
        Ok(())
    }

    /// Warm images: (image, clones of its sandboxes ready, target).
    pub(crate) fn warm(&self) -> Vec<(String, usize, usize)> {
        let mut state = self.lock();
        let warm: Vec<(String, usize)> = state.warm.iter().map(|(i, &n)| (i.clone(), n)).collect();
        warm.into_iter()
            .map(|(image, target)| {
                let shape = state.warm_shapes.get(&image).cloned();
                let ready = shape.map_or(0, |shape| state.ready(Some(&shape)));
                (image, ready, target)
            })
            .collect()
    }
}

/// Most clones kept warm for one image.
const MAX_WARM: usize = 100;

/// What the vm backend's `warren info` detail puts before its images kept warm, then
/// [`warren_runtime::format_warm`]'s list: "...; warm: busybox 1/2 ready".
pub const WARM_LABEL: &str = "warm: ";

/// The pool's part of the vm backend's `warren info` detail.
fn pool_summary(ready: usize, kept: usize, shapes: usize) -> String {
    format!(
        "templates on; pool: {ready} clone(s) ready, {kept} kept per shape, {shapes} shape(s) in use"
    )
}

/// `(ready, kept per shape)` from a vm backend's `warren info` detail, for clients that wait
/// for the pool (`warren bench run -b vm`); `None` when it says nothing of a pool.
pub fn parse_pool_summary(detail: &str) -> Option<(usize, usize)> {
    let (_, rest) = detail.split_once("pool: ")?;
    let (ready, rest) = rest.split_once(" clone(s) ready, ")?;
    let (kept, _) = rest.split_once(" kept per shape")?;
    Some((ready.parse().ok()?, kept.parse().ok()?))
}

impl Drop for Templates {
    /// Pool clones belong to this server: they end with it (sandboxes do not).
    fn drop(&mut self) {
        let pool = std::mem::take(&mut self.lock().pool);
        for clone in pool {
            clone.booted.qemu.reference().kill();
            let _ = std::fs::remove_dir_all(&clone.dir);
        }
    }
}

/// The key of a template of `shape`: a hash of everything its saved state depends on.
fn key(inner: &Inner, shape: &Shape) -> String {
    let h = &inner.config.vm.hypervisor;
    let stamp = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| {
                use std::os::unix::fs::MetadataExt as _;
                format!("{}:{}:{}", m.len(), m.mtime(), m.ino())
            })
            .unwrap_or_default()
    };
    let machine = shape.machine(inner);
    let mut hasher = sha2::Sha256::new();
    for part in [
        h.path.display().to_string(),
        stamp(&h.kernel_path),
        stamp(&h.initrd_path),
        h.image_path.display().to_string(),
        h.entropy_source.display().to_string(),
        format!("{} {}", shape.vcpus, shape.memory_mb),
        shape.root_disk.as_deref().map(stamp).unwrap_or_default(),
        shape
            .root_disk
            .as_deref()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
        inner.accel().to_string(),
        h.machine.clone(),
        machine.kernel_params(),
        warren_guest::VERSION.to_string(),
    ] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    let digest = hasher.finalize();
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn template_dir(inner: &Inner, shape: &Shape) -> PathBuf {
    inner.templates.root.join(key(inner, shape))
}

fn ready(dir: &Path) -> bool {
    dir.join(STATE).is_file() && dir.join(RAM).is_file()
}

/// Boots a template VM of `shape` and saves it; returns its directory. An existing one is
/// kept unless `rebuild`.
pub(crate) async fn build(
    inner: &Arc<Inner>,
    shape: &Shape,
    rebuild: bool,
) -> Result<PathBuf, BackendError> {
    inner
        .available
        .as_ref()
        .map_err(|e| BackendError::Other(e.clone()))?;
    let channel = inner.config.vm.hypervisor.channel;
    if channel.is_vsock() {
        return Err(BackendError::Invalid(format!(
            "hypervisor.channel: {:?} has no templates (clones are snapshots: qemu cannot \
             snapshot a vhost-user device, and warren does not clone over kernel vsock yet); \
             templates need channel = \"serial\"",
            channel.name()
        )));
    }
    let dir = template_dir(inner, shape);
    if ready(&dir) && !rebuild {
        return Ok(dir);
    }
    std::fs::create_dir_all(&inner.templates.root)
        .map_err(|e| BackendError::io("create", &inner.templates.root, e))?;
    let work =
        inner
            .templates
            .root
            .join(format!(".{}-{}.tmp", key(inner, shape), std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir(&work).map_err(|e| BackendError::io("create", &work, e))?;
    let mut result = save(inner, shape, &work).await;
    if result.is_ok()
        && let Some(disk) = &shape.root_disk
    {
        result = std::fs::write(work.join(DISK), disk.as_os_str().as_encoded_bytes())
            .map_err(|e| BackendError::io("write", &work.join(DISK), e));
    }
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&work);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&work, &dir).map_err(|e| BackendError::io("move into place", &dir, e))?;
    info!(
        template = %dir.display(),
        vcpus = shape.vcpus,
        memory_mb = shape.memory_mb,
        disk = ?shape.root_disk,
        "vm: template saved"
    );
    Ok(dir)
}

async fn save(inner: &Inner, shape: &Shape, dir: &Path) -> Result<(), BackendError> {
    let mut machine = shape.machine(inner);
    machine.memory_file = Some(MemoryFile {
        path: dir.join(RAM),
        shared: true,
    });
    let args = machine.args(dir);
    // The host never connects to a template's guest: it waits for the guest to say on its
    // console that it waits for a host, then pauses it there. A clone's host connection is
    // then the first its port ever had (as in a cold boot); a template whose guest had seen
    // a host come and go restored with its port's output stalled.
    let child = qemu::spawn(&inner.config.vm.hypervisor.path, &args, dir)
        .map_err(|e| BackendError::io("start qemu", &inner.config.vm.hypervisor.path, e))?;
    let mut qemu = QemuProcess::child(child);
    let server = std::process::id() as i32;
    let owner = (
        (qemu.pid, qemu.start),
        (
            server,
            warren_linux::config::process_start_time(server).unwrap_or_default(),
        ),
    );
    let _ = vm::write_json(dir, BUILD_STATE, &owner);
    match vm::guest_waiting(dir, &mut qemu, inner.config.vm.vm.boot_timeout()).await {
        Ok(()) => {}
        Err(Some(how)) => return Err(vm::boot_error(dir, "", Some(how))),
        Err(None) => {
            qemu.kill_and_wait(Duration::from_secs(5)).await;
            return Err(vm::boot_error(
                dir,
                "the template's guest did not come up",
                None,
            ));
        }
    }
    let saved = async {
        let mut qmp = Qmp::connect(&dir.join(qemu::QMP_SOCKET), QMP_PATIENCE).await?;
        qmp.execute("stop", None).await?;
        qmp.execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
        )
        .await?;
        let uri = format!("exec:cat > {}", shell_word(&dir.join(STATE))?);
        qmp.execute("migrate", Some(json!({ "uri": uri }))).await?;
        qmp.wait_migration(Duration::from_secs(60)).await?;
        qmp.execute("quit", None).await.map(|_| ())
    }
    .await;
    qemu.kill_and_wait(Duration::from_secs(10)).await;
    saved.map_err(|e: crate::qmp::QmpError| {
        BackendError::Other(format!(
            "save the template: {}",
            warren_runtime::error_chain(&e)
        ))
    })?;
    // Only the saved state and the RAM are the template; the boot's files go.
    for name in [
        qemu::QMP_SOCKET,
        qemu::CHANNEL_SOCKET,
        qemu::QEMU_LOG,
        BUILD_STATE,
    ] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    Ok(())
}

/// Restores a clone of the template in `template` into `dir`; `for_pool`: a pool clone,
/// whose `pool.json` names its qemu from the start.
async fn restore(
    inner: &Inner,
    shape: &Shape,
    template: &Path,
    dir: &Path,
    for_pool: bool,
) -> Result<Booted, BackendError> {
    std::fs::create_dir_all(dir).map_err(|e| BackendError::io("create", dir, e))?;
    let mut machine = shape.machine(inner);
    machine.memory_file = Some(MemoryFile {
        path: template.join(RAM),
        shared: false,
    });
    machine.incoming = true;
    let args = machine.args(dir);
    let began = std::time::Instant::now();
    let child = qemu::spawn(&inner.config.vm.hypervisor.path, &args, dir)
        .map_err(|e| BackendError::io("start qemu", &inner.config.vm.hypervisor.path, e))?;
    let mut qemu = QemuProcess::child(child);
    if for_pool {
        // From now on a stopping server finds it (`end_pool`), even mid-restore.
        let _ = vm::write_json(dir, POOL_STATE, &(qemu.pid, qemu.start));
    }
    // A pool clone's restore gives up sooner: the pool refills one clone at a time, and a
    // restore that hangs (rare; a guest that never answers) held it up for the whole wait.
    let patience = if for_pool {
        POOL_PATIENCE
    } else {
        QMP_PATIENCE
    };
    let restored = async {
        let qmp_path = dir.join(qemu::QMP_SOCKET);
        let deadline = tokio::time::Instant::now() + patience;
        // qemu binds the socket a moment before it listens: retry until it answers.
        let mut qmp = loop {
            match Qmp::connect(&qmp_path, patience).await {
                Ok(q) => break q,
                Err(crate::qmp::QmpError::Io { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(e) => return Err(e),
            }
        };
        qmp.execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
        )
        .await?;
        let uri = format!("exec:cat {}", shell_word(&template.join(STATE))?);
        qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .await?;
        loop {
            let status = qmp.execute("query-status", None).await?;
            if status["status"].as_str() != Some("inmigrate") {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(crate::qmp::QmpError::Timeout {
                    path: qmp_path.display().to_string(),
                    command: "migrate-incoming".into(),
                    timeout: patience,
                });
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        qmp.execute("cont", None).await.map(|_| ())
    }
    .await;
    if let Err(e) = restored {
        qemu.kill_and_wait(Duration::from_secs(5)).await;
        return Err(vm::boot_error(
            dir,
            &format!("restore: {}", warren_runtime::error_chain(&e)),
            None,
        ));
    }
    let address = crate::channel::Address::Serial {
        path: dir.join(qemu::CHANNEL_SOCKET),
    };
    let patience = if for_pool {
        POOL_PATIENCE.min(inner.config.vm.vm.boot_timeout())
    } else {
        inner.config.vm.vm.boot_timeout()
    };
    match crate::channel::ready(&address, patience, || qemu.running()).await {
        Ok(mut ready) => {
            debug!(dir = %dir.display(), took = ?began.elapsed(), "vm: clone answered");
            if for_pool {
                let t = std::time::Instant::now();
                if let Err(why) = warm(inner, shape, &mut ready.client).await {
                    // A guest that does not answer here would not answer a hand-out's
                    // `Start` either: not pooled.
                    qemu.kill_and_wait(Duration::from_secs(5)).await;
                    return Err(vm::boot_error(dir, &format!("warm-up: {why}"), None));
                }
                debug!(dir = %dir.display(), took = ?t.elapsed(), "vm: pool clone warmed");
            }
            Ok(Booted {
                qemu,
                client: ready.client,
                start_seeds: ready.start_seeds,
                storage_limit: ready.storage_limit,
                address,
                target: ready.target,
                device: None,
            })
        }
        Err(e) => {
            qemu.kill_and_wait(Duration::from_secs(5)).await;
            Err(vm::boot_error(dir, &e.to_string(), None))
        }
    }
}

/// Runs once in a pool clone what a hand-out runs: `Prepare`'s reseed, `Start`'s limits and
/// a process started, run and reaped (`/bin/true` through `Exec`, in the initramfs). Under
/// TCG a restored clone starts with no translated code, and translating the guest kernel's
/// and warren-guest's paths the first time they run cost a hand-out more than running them:
/// warmed here, off the create path. An image clone's root is mounted here too (`Prepare`'s
/// `root_device`; ~0.1 s of a hand-out under TCG), so its `Start` finds it mounted. A clone
/// whose guest fails or does not answer within `WARM_PATIENCE` is not pooled.
async fn warm(
    inner: &Inner,
    shape: &Shape,
    client: &mut crate::channel::Client,
) -> Result<(), String> {
    use warren_guest::proto;
    let seed = || crate::monitor::entropy(&inner.config.vm.hypervisor.entropy_source);
    let steps = async {
        client
            .prepare(proto::PrepareRequest {
                seed: seed(),
                ..Default::default()
            })
            .await?;
        client.set_limits(proto::Limits::default()).await?;
        let start = proto::ExecInput {
            input: Some(proto::exec_input::Input::Start(proto::ExecStart {
                argv: vec!["/bin/true".into()],
                env: vec!["PATH=/bin:/sbin".into()],
                cwd: "/".into(),
                ..Default::default()
            })),
        };
        let mut replies = client.exec(tokio_stream::iter([start])).await?.into_inner();
        while let Some(reply) = tokio_stream::StreamExt::next(&mut replies).await {
            if let Some(proto::exec_output::Output::ExitCode(_)) = reply?.output {
                break;
            }
        }
        if shape.root_disk.is_some() {
            client
                .prepare(proto::PrepareRequest {
                    seed: seed(),
                    root_device: qemu::root_device(),
                    ..Default::default()
                })
                .await?;
        }
        Ok::<(), tonic::Status>(())
    };
    match tokio::time::timeout(WARM_PATIENCE, steps).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(s)) => Err(s.message().to_string()),
        Err(_) => Err(format!("the guest did not answer within {WARM_PATIENCE:?}")),
    }
}

/// How long a pool clone's warm-up may take (~0.3 s under TCG here); the pool refills one
/// clone at a time, so a guest that hangs holds the refill up this long.
const WARM_PATIENCE: Duration = Duration::from_secs(10);
/// How long each step of a pool clone's restore (the migration, the guest's answer) may
/// take: ~0.2 s in all under TCG here, seconds on a loaded host.
const POOL_PATIENCE: Duration = Duration::from_secs(10);

/// A clone for a sandbox of this shape in `dir`: from the pool, else restored now; `None`
/// when there is no template yet (one is built in the background, and this sandbox boots
/// cold). The caller moves it into the sandbox's cgroup.
pub(crate) async fn take(inner: &Arc<Inner>, shape: &Shape, dir: &Path) -> Option<(Booted, bool)> {
    let t = &inner.templates;
    if !t.enabled {
        return None;
    }
    let template = template_dir(inner, shape);
    let (pooled, dead) = {
        let mut state = t.lock();
        state.wanted.insert(shape.clone());
        let mut dead = Vec::new();
        let mut pooled = None;
        while let Some(i) = state.pool.iter().position(|c| c.shape == *shape) {
            let mut clone = state.pool.swap_remove(i);
            if clone.booted.qemu.running() {
                pooled = Some(clone);
                break;
            }
            dead.push(clone);
        }
        (pooled, dead)
    };
    if pooled.is_none() {
        t.refill.notify_one();
    }
    end_dead(dead).await;
    match pooled {
        Some(clone) => {
            if let Err(e) = std::fs::rename(&clone.dir, dir) {
                t.refill.notify_one();
                warn!("vm: move a pool clone to {}: {e}", dir.display());
                clone.end().await;
                return None;
            }
            let _ = std::fs::remove_file(dir.join(POOL_STATE));
            // Its socket moved with it: a reconnect (after a broken connection) finds it.
            let address = crate::channel::Address::Serial {
                path: dir.join(qemu::CHANNEL_SOCKET),
            };
            clone.booted.target.set(address.clone());
            let mut booted = clone.booted;
            booted.address = address;
            Some((booted, true))
        }
        None if ready(&template) => match restore(inner, shape, &template, dir, false).await {
            Ok(b) => Some((b, false)),
            Err(e) => {
                warn!("vm: restore a clone: {e}");
                let _ = std::fs::remove_dir_all(dir);
                None
            }
        },
        None => {
            spawn_build(inner, shape);
            None
        }
    }
}

/// Removes pool clones whose qemu has ended (found by [`State::take_dead`] or a hand-out).
async fn end_dead(dead: Vec<Clone>) {
    if dead.is_empty() {
        return;
    }
    warn!(
        clones = dead.len(),
        "vm: pool clones whose qemu had ended were dropped from the pool"
    );
    for clone in dead {
        clone.end().await;
    }
}

/// Wakes the pool's refill, after a hand-out finished: a clone restored meanwhile would take
/// the CPU the handed-out guest needs for `Prepare` and `Start` (on two cores under TCG it
/// made a hand-out several times slower).
pub(crate) fn refill_soon(inner: &Inner) {
    inner.templates.refill.notify_one();
}

/// Builds the template of `shape` in the background, once.
fn spawn_build(inner: &Arc<Inner>, shape: &Shape) {
    {
        let mut state = inner.templates.lock();
        if state.failed.contains_key(shape) || !state.building.insert(shape.clone()) {
            return;
        }
    }
    let weak = Arc::downgrade(inner);
    let shape = shape.clone();
    tokio::spawn(async move {
        let Some(inner) = weak.upgrade() else { return };
        let result = build(&inner, &shape, false).await;
        let mut state = inner.templates.lock();
        state.building.remove(&shape);
        if let Err(e) = result {
            let why = warren_runtime::error_chain(&e);
            warn!(
                vcpus = shape.vcpus,
                memory_mb = shape.memory_mb,
                disk = ?shape.root_disk,
                "vm: no template: {why}"
            );
            state.failed.insert(shape, why);
        } else {
            drop(state);
            inner.templates.refill.notify_one();
        }
    });
}

/// Drops what was made for the image disks `disks` (their images are gone from the store):
/// their shapes leave the pool and the warm images' shapes, and their templates (found by
/// the disk each names) are removed, and their pool clones ended.
pub(crate) async fn forget_disks(inner: &Inner, disks: &HashSet<PathBuf>) {
    let of = |s: &Shape| s.root_disk.as_ref().is_some_and(|d| disks.contains(d));
    let clones: Vec<Clone> = {
        let mut state = inner.templates.lock();
        state.wanted.retain(|s| !of(s));
        state.failed.retain(|s, _| !of(s));
        state.warm_shapes.retain(|_, s| !of(s));
        state.pool.extract_if(.., |c| of(&c.shape)).collect()
    };
    for entry in std::fs::read_dir(&inner.templates.root)
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(named) = std::fs::read(entry.path().join(DISK)) else {
            continue;
        };
        let named = PathBuf::from(std::ffi::OsString::from_vec(named));
        if disks.contains(&named) {
            info!(template = %entry.path().display(), disk = %named.display(), "vm: removing the template of a removed image");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    for clone in clones {
        clone.end().await;
    }
}

/// Ends template builds whose server is gone (killed mid-build: its qemu would idle on
/// forever) and removes their directories. The template directory may be shared by several
/// servers: a build whose server lives is left alone.
pub(crate) fn clean_builds(inner: &Inner) {
    let root = &inner.templates.root;
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with('.') && name.ends_with(".tmp")) {
            continue;
        }
        let Ok((q, s)) = vm::read_json::<((i32, u64), (i32, u64))>(&entry.path(), BUILD_STATE)
        else {
            continue;
        };
        // Alive and not a zombie (a killed server's parent may not have reaped it yet).
        let server = QemuRef {
            pid: s.0,
            start: s.1,
        };
        if server.alive() {
            continue;
        }
        warn!(dir = %entry.path().display(), "vm: ending a template build whose server is gone");
        QemuRef {
            pid: q.0,
            start: q.1,
        }
        .kill();
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

/// Kills and removes pool clones a previous server left (killed before it could end them).
pub(crate) fn clean_pool(inner: &Inner) {
    let pool = &inner.templates.pool_dir;
    for entry in std::fs::read_dir(pool).into_iter().flatten().flatten() {
        if let Ok(r) = vm::read_json::<(i32, u64)>(&entry.path(), POOL_STATE) {
            QemuRef {
                pid: r.0,
                start: r.1,
            }
            .kill();
        }
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

/// Starts the task that keeps the pool full.
pub(crate) fn start_refill(inner: &Arc<Inner>) {
    let t = &inner.templates;
    // Also without a pool (`pool = 0`): images kept warm are filled by the same loop.
    if !t.enabled {
        return;
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(refill_loop(Arc::downgrade(inner)));
        runtime.spawn(end_pool_on_stop(Arc::downgrade(inner)));
    }
}

/// Pool clones belong to the server: a stopping server (SIGTERM, SIGINT) ends them, whether
/// or not the backend is dropped on the way out. (After a `kill -9` the next start does,
/// from their `pool.json`.)
async fn end_pool_on_stop(weak: Weak<Inner>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    if let Some(inner) = weak.upgrade() {
        inner
            .templates
            .stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let pool = std::mem::take(&mut inner.templates.lock().pool);
        for clone in pool {
            clone.booted.qemu.reference().kill();
            let _ = std::fs::remove_dir_all(&clone.dir);
        }
        // And a clone still being restored for the pool (its `pool.json` is written when
        // its qemu starts): the process may exit before that restore finishes.
        clean_pool(&inner);
    }
}

/// What the pool keeps: `pool` clones of every shape used since start, and for each warm
/// image its count of clones of its sandboxes' shape (whose template is built first). Shapes
/// without a template yet are left out, and so are the used shapes of images no name stands
/// for any more: imported again, a name's creates get the new image, and clones of the old
/// one would idle until it is removed.
fn refill_targets(inner: &Arc<Inner>, reported: &mut HashSet<String>) -> HashMap<Shape, usize> {
    let t = &inner.templates;
    if let Some(images) = &inner.config.images {
        let cache = crate::image::disk_cache(&inner.config.dir);
        match crate::image::named_disks(images, &cache) {
            Ok(named) => {
                let mut state = t.lock();
                let before = state.wanted.len();
                state
                    .wanted
                    .retain(|s| s.root_disk.as_ref().is_none_or(|d| named.contains(d)));
                if state.wanted.len() < before {
                    info!(
                        shapes = before - state.wanted.len(),
                        "vm: the pool stops keeping clones of images no name stands for any more (imported again)"
                    );
                }
            }
            Err(e) => debug!("vm: cannot list the images for the pool: {e}"),
        }
    }
    let (wanted, warm) = {
        let state = t.lock();
        (state.wanted.clone(), state.warm.clone())
    };
    let mut targets: HashMap<Shape, usize> = wanted.into_iter().map(|s| (s, t.target)).collect();
    for (image, count) in warm {
        let shape = match warm_shape(inner, &image) {
            Ok(shape) => shape,
            Err(e) => {
                if reported.insert(image.clone()) {
                    warn!(%image, "vm: warm clones wait for their image: {}", warren_runtime::error_chain(&e));
                }
                continue;
            }
        };
        t.lock().warm_shapes.insert(image, shape.clone());
        let target = targets.entry(shape).or_insert(0);
        *target = (*target).max(count);
    }
    targets.retain(|shape, _| {
        let built = ready(&template_dir(inner, shape));
        if !built && t.lock().warm_shapes.values().any(|s| s == shape) {
            spawn_build(inner, shape);
        }
        built
    });
    targets
}

/// The shape of `image`'s sandboxes at the config's size: its disk made if need be.
fn warm_shape(inner: &Inner, image: &str) -> Result<Shape, BackendError> {
    let images = inner.config.images.as_ref().ok_or_else(|| {
        BackendError::Invalid(format!("warm {image}: this server has no image store"))
    })?;
    let cache = crate::image::disk_cache(&inner.config.dir);
    let (disk, _) = crate::image::root_disk(images, &cache, image)?;
    let h = &inner.config.vm.hypervisor;
    Ok(Shape {
        vcpus: h.vcpus,
        memory_mb: h.memory_in_mb,
        root_disk: Some(disk),
    })
}

/// Ends pooled clones beyond their shape's target (a warm image's count lowered or set to 0).
async fn trim_pool(inner: &Inner, targets: &HashMap<Shape, usize>) {
    let surplus: Vec<Clone> = {
        let mut state = inner.templates.lock();
        let mut kept: HashMap<Shape, usize> = HashMap::new();
        let wanted = state.wanted.clone();
        let (keep, surplus): (Vec<Clone>, Vec<Clone>) =
            std::mem::take(&mut state.pool).into_iter().partition(|c| {
                let n = kept.entry(c.shape.clone()).or_insert(0);
                *n += 1;
                // A used shape whose template went missing keeps its clones.
                *n <= targets
                    .get(&c.shape)
                    .copied()
                    .unwrap_or(if wanted.contains(&c.shape) {
                        inner.templates.target
                    } else {
                        0
                    })
            });
        state.pool = keep;
        surplus
    };
    for clone in surplus {
        debug!(dir = %clone.dir.display(), "vm: ending a pool clone beyond its target");
        clone.end().await;
    }
}

/// Keeps the pool at its targets ([`refill_targets`]), ending clones beyond them; sleeps
/// until a clone is taken, a target changes or a template is built (or 5 s). Ends with the
/// backend.
async fn refill_loop(weak: Weak<Inner>) {
    let mut reported = HashSet::new();
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let dead = inner.templates.lock().take_dead();
        end_dead(dead).await;
        let targets = refill_targets(&inner, &mut reported);
        trim_pool(&inner, &targets).await;
        for (shape, target) in targets {
            let template = template_dir(&inner, &shape);
            loop {
                let (count, n) = {
                    let mut state = inner.templates.lock();
                    state.seq += 1;
                    (state.ready(Some(&shape)), state.seq)
                };
                if count >= target
                    || inner
                        .templates
                        .stopped
                        .load(std::sync::atomic::Ordering::SeqCst)
                {
                    break;
                }
                let dir = inner
                    .templates
                    .pool_dir
                    .join(format!("{}-{n}", std::process::id()));
                match restore(&inner, &shape, &template, &dir, true).await {
                    Ok(booted) => {
                        let mut state = inner.templates.lock();
                        // Checked under the lock `end_pool` takes the pool with: a clone
                        // restored while the server stopped is ended, not pooled.
                        if inner
                            .templates
                            .stopped
                            .load(std::sync::atomic::Ordering::SeqCst)
                        {
                            drop(state);
                            booted.qemu.reference().kill();
                            let _ = std::fs::remove_dir_all(&dir);
                            break;
                        }
                        state.pool.push(Clone {
                            shape: shape.clone(),
                            dir,
                            booted,
                        });
                    }
                    Err(e) => {
                        warn!("vm: cannot fill the pool: {e}");
                        let _ = std::fs::remove_dir_all(&dir);
                        break;
                    }
                }
            }
        }
        // Not holding the backend while asleep: dropping it ends the loop.
        let refill = Arc::clone(&inner.templates.refill);
        drop(inner);
        tokio::select! {
            () = refill.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// `path` as one word of the `sh -c` line qemu's `exec:` migration runs: quoted, so a
/// directory with spaces or shell characters in its name is that directory.
fn shell_word(path: &Path) -> Result<String, crate::qmp::QmpError> {
    let text = path.display().to_string();
    shlex::try_quote(&text)
        .map(std::borrow::Cow::into_owned)
        .map_err(|e| crate::qmp::QmpError::Protocol {
            path: text.clone(),
            message: format!("cannot be quoted for qemu's exec: migration: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_summary_parses_back() {
        let detail = format!("tcg (no vmx), machine microvm; {}", pool_summary(1, 2, 3));
        assert_eq!(parse_pool_summary(&detail), Some((1, 2)));
        assert_eq!(
            parse_pool_summary("tcg, machine microvm; templates off"),
            None
        );
        assert_eq!(
            parse_pool_summary("pool: x clone(s) ready, 2 kept per shape"),
            None
        );
    }

    fn templates(on: bool) -> Templates {
        let mut vm = crate::config::VmConfig::default();
        vm.vm.templates = on;
        vm.vm.pool = 2;
        Templates::new(&VmBackendConfig {
            dir: PathBuf::from("/nonexistent/vm"),
            vm,
            config_error: None,
            images: None,
            cgroup_parent: "warren-test".into(),
            log_max_bytes: None,
            default_stop_grace: Duration::from_secs(1),
            warm: Vec::new(),
        })
    }

    #[test]
    fn warm_targets_are_set_listed_and_refused_with_reasons() {
        let err = templates(false).set_warm("busybox", 1).unwrap_err();
        assert!(err.to_string().contains("vm.templates"), "{err}");
        let t = templates(true);
        let err = t.set_warm("busybox", MAX_WARM + 1).unwrap_err();
        assert!(err.to_string().contains("more than 100"), "{err}");
        t.set_warm("busybox", 2).unwrap();
        t.set_warm("alpine", 1).unwrap();
        // Nothing is ready before the refill has found the images and filled the pool.
        assert_eq!(
            t.warm(),
            vec![("alpine".into(), 0, 1), ("busybox".into(), 0, 2)]
        );
        assert!(
            t.summary().ends_with(
                "2 kept per shape, 0 shape(s) in use; warm: alpine 0/1 ready, busybox 0/2 ready"
            ),
            "{}",
            t.summary()
        );
        assert_eq!(parse_pool_summary(&t.summary()), Some((0, 2)));
        t.set_warm("alpine", 0).unwrap();
        assert_eq!(t.warm(), vec![("busybox".into(), 0, 2)]);
    }

    #[test]
    fn a_state_path_is_one_shell_word() {
        for dir in ["/dev/shm/warren-vm/t1", "/tmp/a b/$(touch x)/it's;`id`"] {
            let path = Path::new(dir).join("state");
            let word = shell_word(&path).unwrap();
            let line = format!("cat > {word}");
            assert_eq!(
                shlex::split(&line).unwrap(),
                ["cat", ">", path.to_str().unwrap()],
                "{line}"
            );
        }
    }
}
