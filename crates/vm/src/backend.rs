//! [`VmBackend`]: sandboxes as microVMs.
//!
//! A create only validates and plans (no qemu runs until start, so a bad request leaves
//! nothing behind). A start boots the VM (or takes a ready clone of a template, see
//! [`crate::template`]), hands the guest its workload, and leaves a monitor task
//! ([`crate::monitor`]) with it, which writes the output to the sandbox's log, pings the
//! guest, notices every way the VM can end, and records the end (`exit.json`).
//!
//! VMs outlive the server: qemu runs in its own process group, and a restarted server finds
//! each again through `vm.json` (qemu's pid and start time), reconnects to the guest and
//! resumes the output where its log ends ([`Backend::adopt`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};
use warren_guest::proto;
use warren_image::ImageStore;
use warren_runtime::logs::LogWriter;
use warren_runtime::{
    Backend, BackendError, BackendInfo, BackendStatus, EventSink, ExecProcess, ExecRequest,
    SandboxConfig,
};
use warren_spec::{BackendKind, ResourceInfo, parse_image_user, parse_user};

use crate::channel::Client;
use crate::config::{Acceleration, MIN_MEMORY_MB, VmConfig};
use crate::qemu::{self, Machine};
use crate::vm::{self, ExitRecord, QemuRef, VmState};

/// Least memory limit a VM sandbox may ask for (its workload's cgroup in the guest).
pub const MIN_SANDBOX_MEMORY: u64 = 16 << 20;
/// Guest RAM on top of the sandbox's memory limit: the guest kernel's own.
pub const GUEST_OVERHEAD_MB: u64 = 96;
/// Hidden directories of the backend's own under its dir (not sandboxes).
pub const IMAGES_DIR: &str = ".images";
pub const TEMPLATES_DIR: &str = ".templates";
pub const POOL_DIR: &str = ".pool";

/// Settings of the vm backend.
#[derive(Debug, Clone)]
pub struct VmBackendConfig {
    /// Sandboxes live in `<dir>/<id>`.
    pub dir: PathBuf,
    pub vm: VmConfig,
    /// Why the config cannot work, found when it was loaded (the backend is then unavailable
    /// with this reason, and creates fail with it).
    pub config_error: Option<String>,
    pub images: Option<ImageStore>,
    pub cgroup_parent: String,
    pub log_max_bytes: Option<u64>,
    pub default_stop_grace: Duration,
    /// Clones of an image's sandboxes kept ready, by image name (`--warm vm:IMAGE=N`).
    pub warm: Vec<(String, usize)>,
}

#[derive(Debug, Clone)]
pub struct VmBackend {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub config: VmBackendConfig,
    pub events: EventSink,
    /// qemu and the acceleration, or why VMs cannot run here.
    pub available: Result<Acceleration, String>,
    pub cgroups: Option<warren_linux::cgroup::CgroupLayout>,
    pub tsc_khz: Option<u64>,
    sandboxes: Mutex<HashMap<String, Sandbox>>,
    pub templates: crate::template::Templates,
}

#[derive(Debug)]
pub(crate) struct Sandbox {
    resources: ResourceInfo,
    info: BackendInfo,
    status: BackendStatus,
    pending: Option<Plan>,
    running: Option<Running>,
    /// True once the monitor has recorded the end and torn the VM down.
    done: Option<watch::Receiver<bool>>,
}

/// What the VM of a running sandbox is, for calls other than the monitor's.
#[derive(Debug, Clone)]
pub(crate) struct Running {
    pub client: Client,
    pub qemu: QemuRef,
    pub state: VmState,
    pub stopping: Arc<AtomicBool>,
    /// Its vCPUs are stopped (`warren pause`): the monitor sends no health pings.
    pub paused: Arc<AtomicBool>,
}

/// A sandbox planned by create: its VM's shape and the workload.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub vcpus: u32,
    pub memory_mb: u64,
    pub root_disk: Option<PathBuf>,
    pub start: proto::StartRequest,
    pub timeout: Option<Duration>,
}

fn not_found(id: &str) -> BackendError {
    BackendError::not_found(BackendKind::Vm, id)
}

impl VmBackend {
    /// Probes qemu, the assets and the acceleration; a backend that cannot run here is still
    /// made (it reports why through `is_available`).
    pub fn new(config: VmBackendConfig, events: EventSink) -> Result<Self, BackendError> {
        std::fs::create_dir_all(&config.dir)
            .map_err(|e| BackendError::io("create", &config.dir, e))?;
        let available = probe(&config);
        match &available {
            Ok(a) => info!(accel = a.accel, why = %a.why, "vm: VMs run under {}", a.accel),
            Err(reason) => info!(reason = %reason, "vm: unavailable"),
        }
        let cgroups = warren_linux::cgroup::CgroupLayout::detect().ok();
        let templates = crate::template::Templates::new(&config);
        // `--warm vm:...` that cannot work stops the server with the reason.
        for (image, count) in &config.warm {
            templates.set_warm(image, *count)?;
        }
        let backend = VmBackend {
            inner: Arc::new(Inner {
                config,
                events,
                available,
                cgroups,
                tsc_khz: qemu::host_tsc_khz(),
                sandboxes: Mutex::new(HashMap::new()),
                templates,
            }),
        };
        crate::template::clean_pool(&backend.inner);
        crate::template::clean_builds(&backend.inner);
        if backend.inner.available.is_ok() {
            crate::template::start_refill(&backend.inner);
        }
        // Images removed while no server ran (or by an older one) leave their disks.
        backend.images_removed();
        Ok(backend)
    }

    /// How VMs are accelerated here (`kvm`/`tcg` and why), when they can run.
    pub fn acceleration(&self) -> Result<&Acceleration, &String> {
        self.inner.available.as_ref()
    }

    /// Builds the template of VMs for sandboxes with these limits (none: the config's
    /// default size), unless it exists or `rebuild`. Returns its directory. With
    /// `root_disk` (an image's disk, as [`crate::image::root_disk`] makes it in the server's
    /// [`crate::image::disk_cache`]) it is the template of that image's sandboxes; without,
    /// of sandboxes without an image.
    pub async fn build_template(
        &self,
        resources: &ResourceInfo,
        root_disk: Option<PathBuf>,
        rebuild: bool,
    ) -> Result<PathBuf, BackendError> {
        let (vcpus, memory_mb) = vm_size(&self.inner.config.vm.hypervisor, resources)?;
        let shape = crate::template::Shape {
            vcpus,
            memory_mb,
            root_disk,
        };
        crate::template::build(&self.inner, &shape, rebuild).await
    }

    /// Clones ready in the pool now.
    pub fn pooled(&self) -> usize {
        self.inner.templates.pooled()
    }

    fn dir(&self, id: &str) -> PathBuf {
        vm::sandbox_dir(&self.inner.config.dir, id)
    }
}

/// Removes the disks of images the store no longer has and what was made from them (see
/// [`crate::template::forget_disks`]). A VM still running from one keeps its open file.
async fn collect_image_disks(inner: Arc<Inner>) {
    let Some(images) = &inner.config.images else {
        return;
    };
    let cache = crate::image::disk_cache(&inner.config.dir);
    let orphans = match crate::image::orphan_disks(images, &cache) {
        Ok(orphans) => orphans,
        Err(e) => {
            warn!("vm: cannot list the images to collect their disks: {e}");
            return;
        }
    };
    if orphans.is_empty() {
        return;
    }
    let disks: std::collections::HashSet<PathBuf> = orphans.iter().cloned().collect();
    crate::template::forget_disks(&inner, &disks).await;
    for disk in &orphans {
        match std::fs::remove_file(disk) {
            Ok(()) => info!(disk = %disk.display(), "vm: removed the disk of a removed image"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(disk = %disk.display(), "vm: cannot remove the disk of a removed image: {e}")
            }
        }
    }
}

/// Whether VMs can run here: the config is sound, qemu runs, the machine type exists.
fn probe(config: &VmBackendConfig) -> Result<Acceleration, String> {
    if let Some(e) = &config.config_error {
        return Err(e.clone());
    }
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root (cgroups for qemu, image disks)".into());
    }
    let h = &config.vm.hypervisor;
    // The checks that need no qemu first: a node without the assets does not pay for
    // starting qemu at every server start.
    config.vm.validate(&[]).map_err(|e| e.to_string())?;
    let help = std::process::Command::new(&h.path)
        .args(["-machine", "help"])
        .output()
        .map_err(|e| {
            format!(
                "hypervisor.path: {} cannot run ({e}); install qemu-system-x86",
                h.path.display()
            )
        })?;
    let machines = crate::config::machine_types(&String::from_utf8_lossy(&help.stdout));
    if !help.status.success() || machines.is_empty() {
        return Err(format!(
            "hypervisor.path: {} is not a qemu-system binary (`-machine help` {}, listing no \
             machine types); install qemu-system-x86",
            h.path.display(),
            help.status
        ));
    }
    config.vm.validate(&machines).map_err(|e| e.to_string())?;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    crate::config::probe_accel(h.accel, &cpuinfo, kvm_opens).map_err(|e| e.to_string())
}

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, HashMap<String, Sandbox>> {
        self.sandboxes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn accel(&self) -> &str {
        self.available.as_ref().map(|a| a.accel).unwrap_or("tcg")
    }

    /// The command line of a VM of this shape.
    pub fn machine(&self, vcpus: u32, memory_mb: u64) -> Machine<'_> {
        Machine {
            hypervisor: &self.config.vm.hypervisor,
            accel: self.accel(),
            vcpus,
            memory_mb,
            tsc_khz: self.tsc_khz,
            root_disk: None,
            memory_file: None,
            incoming: false,
            vsock_cid: 0,
        }
    }

    /// The host cgroup qemu runs in: guest RAM plus qemu's own, and the sandbox's CPU.
    pub fn make_cgroup(
        &self,
        name: &str,
        memory_mb: u64,
        resources: &ResourceInfo,
    ) -> Result<Option<warren_linux::cgroup::Cgroup>, BackendError> {
        let Some(layout) = &self.cgroups else {
            return Ok(None);
        };
        let limits = warren_linux::cgroup::CgroupLimits {
            memory_bytes: Some((memory_mb + self.config.vm.vm.qemu_overhead_mb) << 20),
            pids: None,
            cpu_limit_millis: resources.cpu_limit.map(|c| (c * 1000.0).ceil() as u64),
            cpu_request_millis: resources.cpu_request.map(|c| (c * 1000.0).ceil() as u64),
        };
        warren_linux::cgroup::Cgroup::create(layout, &self.config.cgroup_parent, name, &limits)
            .map(Some)
            .map_err(|e| {
                BackendError::Other(format!(
                    "cgroup for qemu: {}",
                    warren_runtime::error_chain(&e)
                ))
            })
    }

    pub fn cgroup(&self, name: &str) -> Option<warren_linux::cgroup::Cgroup> {
        let layout = self.cgroups.as_ref()?;
        Some(warren_linux::cgroup::Cgroup::open(
            layout,
            &self.config.cgroup_parent,
            name,
        ))
    }

    /// Records a sandbox's end (the monitor calls it once).
    pub(crate) fn ended(&self, id: &str, status: &BackendStatus) {
        let mut sandboxes = self.lock();
        if let Some(sb) = sandboxes.get_mut(id) {
            sb.status = status.clone();
        }
    }

    pub(crate) fn finished(&self, id: &str) {
        if let Some(sb) = self.lock().get_mut(id) {
            sb.running = None;
        }
    }
}

/// The vCPUs and memory (MB) of a sandbox's VM: from its limits (its memory plus what the
/// guest kernel keeps), else the config's.
fn vm_size(
    h: &crate::config::Hypervisor,
    resources: &ResourceInfo,
) -> Result<(u32, u64), BackendError> {
    let invalid = |field: &str, value: &dyn std::fmt::Display, reason: &str| {
        BackendError::Invalid(format!("{field}: {value} {reason}"))
    };
    let memory_mb = match resources.memory_limit {
        Some(bytes) if bytes < MIN_SANDBOX_MEMORY => {
            return Err(invalid(
                "resources.limits.memory",
                &warren_spec::format_bytes(bytes),
                &format!(
                    "is below the vm backend's minimum of {}",
                    warren_spec::format_bytes(MIN_SANDBOX_MEMORY)
                ),
            ));
        }
        Some(bytes) => (bytes.div_ceil(1 << 20) + GUEST_OVERHEAD_MB).max(MIN_MEMORY_MB),
        None => h.memory_in_mb,
    };
    // qemu would start, then fail to map the guest's memory.
    if let Some(total) = crate::config::host_memory_mb()
        && memory_mb > total
    {
        return Err(match resources.memory_limit {
            Some(bytes) => invalid(
                "resources.limits.memory",
                &warren_spec::format_bytes(bytes),
                &format!(
                    "with the guest kernel's {GUEST_OVERHEAD_MB} MiB is more than this host's \
                     memory and swap ({total} MB)"
                ),
            ),
            None => invalid(
                "hypervisor.memory_in_mb",
                &memory_mb,
                &format!("is more than this host's memory and swap ({total} MB)"),
            ),
        });
    }
    let vcpus = match resources.cpu_limit {
        Some(cpu) if cpu > f64::from(crate::config::MAX_VCPUS) => {
            return Err(invalid(
                "resources.limits.cpu",
                &cpu,
                &format!(
                    "is more than the vm backend's {} vCPUs",
                    crate::config::MAX_VCPUS
                ),
            ));
        }
        Some(cpu) => (cpu.ceil() as u32).max(1),
        None => h.vcpus,
    };
    Ok((vcpus, memory_mb))
}

/// The plan of a sandbox: validates everything a create can check.
fn plan(inner: &Inner, config: &SandboxConfig) -> Result<(Plan, BackendInfo), BackendError> {
    let spec = &config.spec;
    let h = &inner.config.vm.hypervisor;
    let mut info = BackendInfo::new();
    let (root_disk, image) = match &spec.image {
        Some(name) => {
            let images = inner.config.images.as_ref().ok_or_else(|| {
                BackendError::Invalid("spec.image: this server has no image store".into())
            })?;
            let cache = crate::image::disk_cache(&inner.config.dir);
            let (disk, image) = crate::image::root_disk(images, &cache, name)?;
            info.insert("image".into(), image.id.clone());
            (Some(disk), Some(image))
        }
        None => (None, None),
    };
    let image_config = image.as_ref().map(|i| &i.config);
    let mut argv: Vec<String> = if spec.command.is_empty() {
        image_config
            .map(|c| c.entrypoint.clone())
            .unwrap_or_default()
    } else {
        spec.command.clone()
    };
    if spec.args.is_empty() && spec.command.is_empty() {
        argv.extend(image_config.map(|c| c.cmd.clone()).unwrap_or_default());
    } else {
        argv.extend(spec.args.iter().cloned());
    }
    if argv.is_empty() {
        return Err(BackendError::Invalid(
            "spec.command: the vm backend needs a command (e.g. warren run -b vm -- /bin/echo hi)"
                .into(),
        ));
    }
    let (vcpus, memory_mb) = vm_size(h, &config.resources)?;
    let mut env: Vec<String> = image_config.map(|c| c.env.clone()).unwrap_or_default();
    // The spec's variables the policy's env.allow lists (the decision's filtered_env names
    // the others); the image's own are the image's.
    let policy = config.policy.as_ref();
    for (k, v) in spec
        .env
        .iter()
        .filter(|(k, _)| policy.is_none_or(|p| p.policy.env_allowed(k)))
    {
        env.retain(|e| e.split_once('=').map_or(e.as_str(), |(key, _)| key) != k);
        env.push(format!("{k}={v}"));
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(
            0,
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    let hostname = spec.hostname_or_default();
    if !env.iter().any(|e| e.starts_with("HOSTNAME=")) {
        env.push(format!("HOSTNAME={hostname}"));
    }
    let (uid, gid) = match (&spec.user, image_config.and_then(|c| c.user.as_deref())) {
        (Some(u), _) => parse_user(u).map_err(|e| BackendError::Invalid(e.to_string()))?,
        (None, Some(u)) if !u.is_empty() => {
            parse_image_user(u).map_err(|e| BackendError::Invalid(e.to_string()))?
        }
        _ => (0, 0),
    };
    let cwd = spec
        .working_dir
        .clone()
        .or_else(|| {
            image_config
                .and_then(|c| c.working_dir.clone())
                .filter(|w| !w.is_empty())
        })
        .unwrap_or_else(|| "/".into());
    let r = &config.resources;
    let start = proto::StartRequest {
        argv: argv.clone(),
        env,
        cwd,
        uid,
        gid,
        limits: Some(proto::Limits {
            memory_bytes: r.memory_limit,
            pids: r.pid_limit,
            cpu_millis: r.cpu_limit.map(|c| (c * 1000.0).ceil() as u64),
        }),
        stdin: config
            .stdin
            .as_ref()
            .map(|s| s.bytes().to_vec())
            .unwrap_or_default(),
        root_device: if root_disk.is_some() {
            qemu::root_device()
        } else {
            String::new()
        },
        hostname,
        sandbox_id: config.id.clone(),
        // A cold boot's kernel seeded itself; a clone's is set at launch.
        seed: Vec::new(),
        // Without an image the workload writes to the initramfs: nothing to size.
        storage_bytes: root_disk.as_ref().and(r.storage_limit),
    };
    info.insert("command".into(), argv.join(" "));
    info.insert("vcpus".into(), vcpus.to_string());
    info.insert("memory_mb".into(), memory_mb.to_string());
    Ok((
        Plan {
            vcpus,
            memory_mb,
            root_disk,
            start,
            timeout: spec.timeout_seconds.map(Duration::from_secs_f64),
        },
        info,
    ))
}

#[async_trait::async_trait]
impl Backend for VmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Vm
    }

    fn is_available(&self) -> Result<(), String> {
        self.inner
            .available
            .as_ref()
            .map(|_| ())
            .map_err(Clone::clone)
    }

    fn set_warm(&self, image: &str, count: usize) -> Result<(), BackendError> {
        self.inner.templates.set_warm(image, count)
    }

    fn warm(&self) -> Vec<(String, usize, usize)> {
        self.inner.templates.warm()
    }

    /// Removes, in the background, the disks of images the store no longer has, with their
    /// templates and pool clones.
    fn images_removed(&self) {
        if self.inner.config.images.is_none() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(collect_image_disks(Arc::clone(&self.inner)));
        }
    }

    fn describe(&self) -> Option<String> {
        let a = self.inner.available.as_ref().ok()?;
        Some(format!(
            "{} ({}), machine {}; {}",
            a.accel,
            a.why,
            self.inner.config.vm.hypervisor.machine,
            self.inner.templates.summary()
        ))
    }

    async fn create(&self, config: &SandboxConfig) -> Result<BackendInfo, BackendError> {
        let id = &config.id;
        warren_runtime::no_published_ports(BackendKind::Vm, &config.spec)?;
        warren_runtime::linux_only_fields(BackendKind::Vm, &config.spec, false)?;
        if self.inner.lock().contains_key(id) {
            return Err(BackendError::AlreadyExists {
                backend: BackendKind::Vm,
                id: id.clone(),
            });
        }
        let inner = Arc::clone(&self.inner);
        let cfg = config.clone();
        // Making an image's disk runs mkfs: off the async workers.
        let (plan, mut info) = tokio::task::spawn_blocking(move || plan(&inner, &cfg))
            .await
            .map_err(|e| BackendError::Other(format!("plan: {e}")))??;
        info.insert("dir".into(), self.dir(id).display().to_string());
        info.insert("accel".into(), self.inner.accel().to_string());
        info.insert(
            "channel".into(),
            self.inner.config.vm.hypervisor.channel.name().to_string(),
        );
        self.inner.lock().insert(
            id.clone(),
            Sandbox {
                resources: config.resources.clone(),
                info: info.clone(),
                status: BackendStatus::Created,
                pending: Some(plan),
                running: None,
                done: None,
            },
        );
        Ok(info)
    }

    async fn start(&self, id: &str) -> Result<(), BackendError> {
        let inner = Arc::clone(&self.inner);
        let (plan, resources) = {
            let mut sandboxes = inner.lock();
            let sb = sandboxes.get_mut(id).ok_or_else(|| not_found(id))?;
            match (&sb.status, sb.pending.take()) {
                (BackendStatus::Created, Some(plan)) => (plan, sb.resources.clone()),
                (status, _) => {
                    return Err(BackendError::Other(format!(
                        "sandbox {id} cannot start: it is {status:?}"
                    )));
                }
            }
        };
        let dir = self.dir(id);
        let started = crate::monitor::launch(&inner, id, &dir, &plan, &resources).await?;
        let (done_tx, done_rx) = watch::channel(false);
        let recorded = {
            let mut sandboxes = inner.lock();
            match sandboxes.get_mut(id) {
                None => false,
                Some(sb) => {
                    sb.status = BackendStatus::Running;
                    sb.running = Some(started.running.clone());
                    sb.done = Some(done_rx);
                    sb.info
                        .insert("pid".into(), started.running.qemu.pid.to_string());
                    sb.info.insert("boot".into(), started.how.to_string());
                    if started.how == "clone" {
                        // Whether the create was a hand-out or waited for a restore.
                        let from = if started.pooled { "pool" } else { "restore" };
                        sb.info.insert("clone_from".into(), from.into());
                    }
                    // As the linux backend says it: pools count a hand-out as a hit.
                    sb.info.insert("warm".into(), started.pooled.to_string());
                    true
                }
            }
        };
        if !recorded {
            // Deleted while it started: its VM, cgroup and directory (made again by the
            // start after the delete removed it) must not outlive it.
            let mut started = started;
            started.qemu.kill_and_wait(Duration::from_secs(5)).await;
            started.running.state.kill();
            if let Some(cg) = inner.cgroup(id) {
                let _ = cg.kill_all();
                let _ = cg.remove();
            }
            let _ = tokio::task::spawn_blocking(move || warren_runtime::remove_tree(&dir)).await;
            return Err(not_found(id));
        }
        tokio::spawn(crate::monitor::run(crate::monitor::Watch {
            inner,
            id: id.to_string(),
            dir,
            qemu: started.qemu,
            running: started.running,
            log: started.log,
            offsets: [0, 0],
            timeout: plan.timeout,
            done: done_tx,
        }));
        Ok(())
    }

    fn info(&self, id: &str) -> Option<BackendInfo> {
        self.inner.lock().get(id).map(|sb| sb.info.clone())
    }

    /// Stops the VM's vCPUs (QMP `stop`): the guest keeps its memory and runs nothing, its
    /// clock included, until `resume` (QMP `cont`).
    async fn pause(&self, id: &str) -> Result<(), BackendError> {
        let running = self.running(id)?;
        if !running.paused.swap(true, Ordering::SeqCst)
            && let Err(e) = qmp_command(&self.dir(id), "stop").await
        {
            running.paused.store(false, Ordering::SeqCst);
            return Err(BackendError::Other(format!("pause sandbox {id}: {e}")));
        }
        Ok(())
    }

    async fn paused(&self, id: &str) -> Option<bool> {
        // An adopted VM's flag is QMP's run state at its adoption.
        let running = self.running(id).ok()?;
        Some(running.paused.load(Ordering::SeqCst))
    }

    async fn processes(&self, id: &str) -> Result<Vec<warren_runtime::ProcessInfo>, BackendError> {
        let running = self.running(id)?;
        // A paused guest answers nothing; `top` does not unpause it behind the user's back.
        // (The control plane refuses first; this is for a pause it has not recorded.)
        if running.paused.load(Ordering::SeqCst) {
            return Err(BackendError::Invalid(
                "the VM is paused: its guest lists its processes once unpaused".into(),
            ));
        }
        let mut client = running.client.clone();
        let reply = tokio::time::timeout(
            PROCESSES_PATIENCE,
            client.processes(proto::ProcessesRequest {}),
        )
        .await
        .map_err(|_| {
            BackendError::Other(format!(
                "list processes: the guest did not answer within {PROCESSES_PATIENCE:?}"
            ))
        })?;
        let list = match reply {
            Ok(reply) => reply.into_inner().processes,
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                return Err(BackendError::Other(
                    "list processes: this VM's guest predates `top` (rebuild the initramfs \
                     with scripts/vm-assets.sh)"
                        .into(),
                ));
            }
            Err(s) => return Err(guest_error("list processes", s)),
        };
        // The guest's numbering: the VM is the sandbox, and no host process stands for one
        // of the guest's. Guest-controlled input: bounded here as the guest bounds it.
        let bound = |text: &mut String, most: usize| {
            if text.len() > most {
                let mut end = most;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
            }
        };
        Ok(list
            .into_iter()
            .take(4096)
            .map(|mut p| {
                bound(&mut p.command, 4096);
                bound(&mut p.state, 8);
                p
            })
            .map(|p| warren_runtime::ProcessInfo {
                pid: p.pid,
                sandbox_pid: None,
                ppid: p.ppid,
                uid: p.uid,
                state: p.state,
                cpu_ns: p.cpu_ns,
                rss_bytes: p.rss_bytes,
                command: p.command,
            })
            .collect())
    }

    async fn resume(&self, id: &str) -> Result<(), BackendError> {
        let running = self.running(id)?;
        resume(&self.dir(id), &running)
            .await
            .map_err(|e| BackendError::Other(format!("unpause sandbox {id}: {e}")))
    }

    async fn signal(&self, id: &str, signal: i32) -> Result<(), BackendError> {
        let running = self.running(id)?;
        // A paused guest answers nothing: it is resumed first, and then gets the signal.
        resume(&self.dir(id), &running)
            .await
            .map_err(|e| BackendError::Other(format!("signal sandbox {id}: unpause: {e}")))?;
        let mut client = running.client.clone();
        tokio::time::timeout(
            Duration::from_secs(5),
            client.signal(proto::SignalRequest { signal }),
        )
        .await
        .map_err(|_| BackendError::Other(format!("signal sandbox {id}: the guest did not answer")))?
        .map_err(|s| guest_error("signal", s))?;
        Ok(())
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<BackendStatus, BackendError> {
        enum Now {
            Running(Box<Running>, watch::Receiver<bool>),
            Ending(BackendStatus, watch::Receiver<bool>),
            Is(BackendStatus),
        }
        let now = {
            let mut sandboxes = self.inner.lock();
            let sb = sandboxes.get_mut(id).ok_or_else(|| not_found(id))?;
            match (&sb.status, &sb.running, &sb.done) {
                (BackendStatus::Running, Some(r), Some(done)) => {
                    Now::Running(Box::new(r.clone()), done.clone())
                }
                (BackendStatus::Created, _, _) => {
                    sb.status = BackendStatus::Stopped;
                    sb.pending = None;
                    Now::Is(BackendStatus::Stopped)
                }
                (status, _, Some(done)) => Now::Ending(status.clone(), done.clone()),
                (status, _, None) => Now::Is(status.clone()),
            }
        };
        let (running, done) = match now {
            Now::Running(r, d) => (*r, d),
            Now::Ending(status, mut done) => {
                // Ended already; its teardown may still run: wait for it (bounded).
                let _ = tokio::time::timeout(Duration::from_secs(15), done.wait_for(|d| *d)).await;
                return Ok(status);
            }
            Now::Is(status) => return Ok(status),
        };
        running.stopping.store(true, Ordering::SeqCst);
        let mut done = done;
        if !grace.is_zero() {
            // A paused guest would not see the SIGTERM: it runs again for its grace period.
            if let Err(e) = resume(&self.dir(id), &running).await {
                warn!(id, "vm: unpause before a stop: {e}");
            }
            let mut client = running.client.clone();
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                client.signal(proto::SignalRequest {
                    signal: libc::SIGTERM,
                }),
            )
            .await;
            let _ = tokio::time::timeout(grace, done.wait_for(|d| *d)).await;
        }
        if !*done.borrow() {
            // The grace period is over: the VM ends now, whatever its guest does.
            running.qemu.kill();
            if tokio::time::timeout(Duration::from_secs(10), done.wait_for(|d| *d))
                .await
                .is_err()
            {
                warn!(id, "vm: the monitor did not see qemu end after SIGKILL");
            }
        }
        self.status(id).await
    }

    async fn delete(&self, id: &str) -> Result<(), BackendError> {
        let known = self.inner.lock().contains_key(id);
        let dir = self.dir(id);
        if known {
            let status = self.stop(id, Duration::ZERO).await?;
            if status == BackendStatus::Running {
                return Err(BackendError::Other(format!(
                    "sandbox {id} is still running after its VM was killed"
                )));
            }
        } else if !dir.is_dir() {
            return Err(not_found(id));
        } else if let Ok(state) = vm::read_json::<VmState>(&dir, vm::STATE_FILE) {
            // An orphan from an earlier run: its VM must not survive it.
            let qemu = QemuRef {
                pid: state.qemu_pid,
                start: state.qemu_start,
            };
            if qemu.alive() {
                qemu.kill();
                for _ in 0..500 {
                    if !qemu.alive() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            if let Some(device) = state.vsock_device {
                device.kill();
            }
        }
        if let Some(cg) = self.inner.cgroup(id)
            && cg.exists()
        {
            let _ = cg.kill_all();
            if let Err(e) = cg.remove() {
                warn!(id, "vm: remove cgroup: {e}");
            }
        }
        self.inner.lock().remove(id);
        let shown = dir.display().to_string();
        tokio::task::spawn_blocking(move || warren_runtime::remove_tree(&dir))
            .await
            .map_err(|e| BackendError::Other(format!("remove {shown}: {e}")))?
            .map(drop)
    }

    /// The counters of the cgroup qemu runs in while the VM runs: guest RAM it touched plus
    /// qemu's own, the vCPUs' and qemu's CPU time, qemu's threads.
    fn usage(&self, id: &str) -> Option<warren_runtime::Usage> {
        if self.inner.lock().get(id)?.status != BackendStatus::Running {
            return None;
        }
        self.inner.cgroup(id)?.stats().ok().map(Into::into)
    }

    async fn status(&self, id: &str) -> Result<BackendStatus, BackendError> {
        self.inner
            .lock()
            .get(id)
            .map(|s| s.status.clone())
            .ok_or_else(|| not_found(id))
    }

    async fn adopt(
        &self,
        config: &SandboxConfig,
    ) -> Result<(BackendStatus, BackendInfo), BackendError> {
        let id = &config.id;
        if let Some(sb) = self.inner.lock().get(id) {
            return Ok((sb.status.clone(), sb.info.clone()));
        }
        let dir = self.dir(id);
        if !dir.is_dir() {
            return Err(not_found(id));
        }
        let mut info = BackendInfo::new();
        info.insert("dir".into(), dir.display().to_string());
        let state = vm::read_json::<VmState>(&dir, vm::STATE_FILE).ok();
        let exit = vm::read_json::<ExitRecord>(&dir, vm::EXIT_FILE).ok();
        let mut sandbox = Sandbox {
            resources: config.resources.clone(),
            info: info.clone(),
            status: BackendStatus::Created,
            pending: None,
            running: None,
            done: None,
        };
        if let Some(state) = &state {
            info.insert("channel".into(), state.channel.name().to_string());
        }
        let status = match (state, exit) {
            (state, Some(exit)) => {
                // A server killed between the exit's record and the VM's teardown leaves
                // them running (with cgroups, their cgroup's removal ends them too).
                if let Some(state) = state {
                    state.kill();
                }
                exit.status()
            }
            (None, None) => BackendStatus::Failed {
                reason: "the VM never started (the server stopped during its start)".into(),
            },
            (Some(state), None) => {
                info.insert("pid".into(), state.qemu_pid.to_string());
                info.insert("accel".into(), state.accel.clone());
                let device = state.vsock_device;
                match crate::monitor::readopt(&self.inner, id, &dir, state).await {
                    Ok(adopted) => {
                        sandbox.running = Some(adopted.running);
                        sandbox.done = Some(adopted.done);
                        BackendStatus::Running
                    }
                    Err(reason) => {
                        if let Some(device) = device {
                            device.kill();
                        }
                        let status = BackendStatus::Failed { reason };
                        let _ = vm::write_json(&dir, vm::EXIT_FILE, &ExitRecord::of(&status));
                        status
                    }
                }
            }
        };
        sandbox.status = status.clone();
        sandbox.info = info.clone();
        self.inner.lock().insert(id.clone(), sandbox);
        Ok((status, info))
    }

    async fn list(&self) -> Result<Vec<String>, BackendError> {
        warren_runtime::sandbox_dirs(&self.inner.config.dir, &[])
    }

    async fn update(&self, id: &str, resources: &ResourceInfo) -> Result<(), BackendError> {
        let limits = proto::Limits {
            memory_bytes: resources.memory_limit,
            pids: resources.pid_limit,
            cpu_millis: resources.cpu_limit.map(|c| (c * 1000.0).ceil() as u64),
        };
        let running = {
            let mut sandboxes = self.inner.lock();
            let sb = sandboxes.get_mut(id).ok_or_else(|| not_found(id))?;
            if sb
                .running
                .as_ref()
                .is_some_and(|r| r.paused.load(Ordering::SeqCst))
            {
                // Its guest runs nothing to apply them.
                return Err(BackendError::Invalid(format!(
                    "sandbox {id} is paused: unpause it before changing its limits"
                )));
            }
            if let Some(plan) = &mut sb.pending {
                plan.start.limits = Some(limits);
            }
            sb.resources = resources.clone();
            sb.running.clone()
        };
        let Some(running) = running else {
            return Ok(());
        };
        let mut client = running.client.clone();
        tokio::time::timeout(Duration::from_secs(5), client.set_limits(limits))
            .await
            .map_err(|_| {
                BackendError::Other(format!("resize sandbox {id}: the guest did not answer"))
            })?
            .map_err(|s| guest_error("resize", s))?;
        Ok(())
    }

    async fn exec(&self, id: &str, request: ExecRequest) -> Result<ExecProcess, BackendError> {
        let running = self.running(id)?;
        crate::exec::exec(running, request).await
    }

    fn log_path(&self, id: &str) -> Option<PathBuf> {
        Some(self.dir(id).join(vm::LOG_FILE))
    }

    fn allocated(&self) -> ResourceInfo {
        let mut total = ResourceInfo::default();
        let add_f = |a: Option<f64>, b: Option<f64>| b.map(|b| a.unwrap_or(0.0) + b).or(a);
        let add_u = |a: Option<u64>, b: Option<u64>| b.map(|b| a.unwrap_or(0) + b).or(a);
        for sb in self.inner.lock().values() {
            if matches!(sb.status, BackendStatus::Running | BackendStatus::Created) {
                let r = &sb.resources;
                total.cpu_limit = add_f(total.cpu_limit, r.cpu_limit);
                total.cpu_request = add_f(total.cpu_request, r.cpu_request);
                total.memory_limit = add_u(total.memory_limit, r.memory_limit);
                total.memory_request = add_u(total.memory_request, r.memory_request);
                total.pid_limit = add_u(total.pid_limit, r.pid_limit);
            }
        }
        total
    }
}

impl VmBackend {
    fn running(&self, id: &str) -> Result<Running, BackendError> {
        let sandboxes = self.inner.lock();
        let sb = sandboxes.get(id).ok_or_else(|| not_found(id))?;
        match (&sb.status, &sb.running) {
            (BackendStatus::Running, Some(r)) => Ok(r.clone()),
            (status, _) => Err(BackendError::Invalid(format!(
                "sandbox {id} is not running ({status:?})"
            ))),
        }
    }
}

/// Runs one QMP command on the VM in `dir`.
pub(crate) async fn qmp_command(dir: &Path, command: &str) -> Result<serde_json::Value, String> {
    let path = dir.join(qemu::QMP_SOCKET);
    let mut qmp = crate::qmp::Qmp::connect(&path, Duration::from_secs(5))
        .await
        .map_err(|e| warren_runtime::error_chain(&e))?;
    qmp.execute(command, None)
        .await
        .map_err(|e| warren_runtime::error_chain(&e))
}

/// Lets a paused VM run on (QMP `cont`); one that is not paused is left as it is.
pub(crate) async fn resume(dir: &Path, running: &Running) -> Result<(), String> {
    if running.paused.load(Ordering::SeqCst) {
        qmp_command(dir, "cont").await?;
        running.paused.store(false, Ordering::SeqCst);
    }
    Ok(())
}

/// How long `top` waits for a guest's process list.
const PROCESSES_PATIENCE: Duration = Duration::from_secs(10);

/// A guest's refusal as the backend's error: its own input errors stay the caller's.
pub(crate) fn guest_error(what: &str, s: tonic::Status) -> BackendError {
    let msg = format!("{what}: {}", s.message());
    match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
            BackendError::Invalid(msg)
        }
        _ => BackendError::Other(msg),
    }
}

/// Opens the sandbox's log for the monitor.
pub(crate) fn open_log(inner: &Inner, dir: &Path) -> Result<LogWriter, BackendError> {
    LogWriter::with_limit(dir.join(vm::LOG_FILE), inner.config.log_max_bytes).map_err(|e| {
        BackendError::Other(format!("open the log: {}", warren_runtime::error_chain(&e)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More guest RAM than the host has (and swap) is refused at create, naming the field
    /// it came from, instead of failing in qemu after it started.
    #[test]
    fn a_vm_larger_than_the_host_is_refused_naming_the_field() {
        let Some(total) = crate::config::host_memory_mb() else {
            eprintln!(
                "SKIP a_vm_larger_than_the_host_is_refused_naming_the_field: no /proc/meminfo"
            );
            return;
        };
        let h = crate::config::Hypervisor::default();
        let fits = ResourceInfo {
            memory_limit: Some(256 << 20),
            ..Default::default()
        };
        assert_eq!(vm_size(&h, &fits).unwrap().1, 256 + GUEST_OVERHEAD_MB);
        let huge = ResourceInfo {
            memory_limit: Some((total + 1) << 20),
            ..Default::default()
        };
        let err = vm_size(&h, &huge).unwrap_err().to_string();
        assert!(
            err.starts_with("resources.limits.memory: ")
                && err.contains("is more than this host's memory and swap"),
            "{err}"
        );
        let big_default = crate::config::Hypervisor {
            memory_in_mb: total + 1,
            ..Default::default()
        };
        let err = vm_size(&big_default, &ResourceInfo::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("hypervisor.memory_in_mb: {} is more", total + 1)),
            "{err}"
        );
    }
}
