//! A running VM sandbox's monitor: one task per VM that owns its qemu process and its log.
//!
//! The log is complete and closed before the end is recorded, so whoever sees an ended
//! status reads the whole log (no `logs_settled` wait is needed).
//!
//! It streams the workload's output into the sandbox's CRI log, pings the guest on an
//! interval, enforces the spec's timeout, and notices every way the VM can end: the
//! workload's exit (reported by the guest), qemu's exit (killed, crashed, or the guest
//! kernel panicked: `panic=-1` reboots and `-no-reboot` makes that qemu's exit), or a guest
//! that stopped answering. It records the end (`exit.json`, then the in-memory status and an
//! event) and tears the VM down: the guest is asked to power off, qemu is killed if it does
//! not.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tracing::{debug, warn};
use warren_guest::proto;
use warren_runtime::logs::{LogWriter, Stream};
use warren_runtime::{BackendError, BackendEvent, BackendStatus};
use warren_spec::ResourceInfo;

use crate::backend::{Inner, Plan, Running, guest_error, open_log};
use crate::channel::{self, Address, Client};
use crate::config::ChannelKind;
use crate::qemu;
use crate::vm::{self, ExitRecord, QemuProcess, VmState};

/// The reasons the control plane shows, as the linux backend names them.
pub const REASON_OOM: &str = "OOMKilled";
pub const REASON_TIMEOUT: &str = "Timeout";

/// A VM that runs its sandbox's workload, ready for [`run`].
#[derive(Debug)]
pub(crate) struct Launched {
    pub qemu: QemuProcess,
    pub running: Running,
    pub log: LogWriter,
    /// `cold` or `clone`.
    pub how: &'static str,
    /// A clone handed out ready from the pool (not restored for this create).
    pub pooled: bool,
}

/// Boots (or clones) the sandbox's VM and starts its workload.
pub(crate) async fn launch(
    inner: &Arc<Inner>,
    id: &str,
    dir: &Path,
    plan: &Plan,
    resources: &ResourceInfo,
) -> Result<Launched, BackendError> {
    let cgroup = inner.make_cgroup(id, plan.memory_mb, resources)?;
    let mut result = launch_in(inner, id, dir, plan, cgroup.as_ref(), FIRST_START_PATIENCE).await;
    // Now and then (about one start in a hundred under TCG here; the cause is not found
    // yet) a guest that booted and answered its ping does not answer `Start`, or its
    // channel breaks during it. Its VM is killed by then and nothing of the workload
    // reached the host, so one more VM is tried; the log says so.
    if let Err(f) = &result
        && f.start_unanswered
    {
        warn!(id, "vm: {}; trying once more in another VM", f.error);
        let _ = warren_runtime::remove_tree(dir);
        result = launch_in(inner, id, dir, plan, cgroup.as_ref(), START_PATIENCE).await;
    }
    let result = result.map_err(|f| f.error);
    if result.is_err()
        && let Some(cg) = &cgroup
    {
        let _ = cg.kill_all();
        let _ = cg.remove();
    }
    result
}

/// How long a guest may take to answer `Start`: the first try, and the one after it.
const FIRST_START_PATIENCE: Duration = Duration::from_secs(15);
const START_PATIENCE: Duration = Duration::from_secs(30);

/// Whether a call failed because the channel to the guest broke, not because the guest
/// said no: tonic's "transport error", or the call's stream reset under it ("operation was
/// canceled": the guest's agent never cancels a call it answers).
fn channel_lost(s: &tonic::Status) -> bool {
    match s.code() {
        tonic::Code::Cancelled => true,
        tonic::Code::Unknown | tonic::Code::Unavailable => s.message().contains("transport error"),
        _ => false,
    }
}

/// Why [`launch_in`] failed, and whether it was a `Start` the guest never answered (worth
/// one more VM).
struct LaunchFailed {
    error: BackendError,
    start_unanswered: bool,
}

impl From<BackendError> for LaunchFailed {
    fn from(error: BackendError) -> Self {
        LaunchFailed {
            error,
            start_unanswered: false,
        }
    }
}

async fn launch_in(
    inner: &Arc<Inner>,
    id: &str,
    dir: &Path,
    plan: &Plan,
    cgroup: Option<&warren_linux::cgroup::Cgroup>,
    patience: Duration,
) -> Result<Launched, LaunchFailed> {
    let shape = crate::template::Shape {
        vcpus: plan.vcpus,
        memory_mb: plan.memory_mb,
        root_disk: plan.root_disk.clone(),
    };
    let clone = crate::template::take(inner, &shape, dir).await;
    let pooled = clone.as_ref().is_some_and(|(_, pooled)| *pooled);
    // A clone's qemu joins the sandbox's cgroup while its guest is prepared and started, and
    // the create answers once it has joined: moving a multi-threaded process between v1
    // cgroups waits for an RCU grace period (~11 ms of a hand-out, traced), which need not
    // delay the guest. Its memory so far stays charged where it was either way (v1 does not
    // move charges).
    let joined = match (&clone, cgroup) {
        (Some((booted, _)), Some(cg)) => {
            let (cg, pid) = (cg.clone(), booted.qemu.pid);
            Some(tokio::task::spawn_blocking(move || cg.add_pid(pid)))
        }
        _ => None,
    };
    let mut start = plan.start.clone();
    let (booted, how) = match clone.map(|(booted, _)| booted) {
        // A clone holds its template's identity and RNG state until told otherwise: in its
        // Start where its guest takes a seed there (one round trip less), else by Prepare.
        Some(booted) if booted.start_seeds => {
            start.seed = entropy(&inner.config.vm.hypervisor.entropy_source);
            (booted, "clone")
        }
        Some(mut booted) => {
            let seed = entropy(&inner.config.vm.hypervisor.entropy_source);
            let prepared = tokio::time::timeout(
                Duration::from_secs(10),
                booted.client.prepare(proto::PrepareRequest {
                    hostname: plan.start.hostname.clone(),
                    sandbox_id: id.to_string(),
                    seed,
                    // `Start` mounts the root (if a warm-up has not).
                    root_device: String::new(),
                }),
            )
            .await;
            if !matches!(prepared, Ok(Ok(_))) {
                if pooled {
                    crate::template::refill_soon(inner);
                }
                booted.qemu.kill_and_wait(Duration::from_secs(5)).await;
                return Err(BackendError::Other(format!(
                    "prepare the clone: {}",
                    match prepared {
                        Ok(Err(s)) => s.message().to_string(),
                        _ => "the guest did not answer".into(),
                    }
                ))
                .into());
            }
            (booted, "clone")
        }
        None => {
            std::fs::create_dir_all(dir).map_err(|e| BackendError::Io {
                action: "create",
                path: dir.display().to_string(),
                source: e,
            })?;
            let mut machine = inner.machine(plan.vcpus, plan.memory_mb);
            machine.root_disk = plan.root_disk.as_deref();
            let h = &inner.config.vm.hypervisor;
            if h.channel == ChannelKind::Vsock {
                machine.vsock_cid = vsock_cid();
            }
            let args = machine.args(dir);
            let link = vm::Link {
                address: Address::of(dir, h.channel, machine.vsock_cid),
                device: (h.channel == ChannelKind::VhostUserVsock).then(|| {
                    crate::config::find_program(&h.vhost_user_vsock_path)
                        .unwrap_or_else(|| h.vhost_user_vsock_path.clone())
                }),
            };
            let booted = vm::boot(
                &h.path,
                &args,
                dir,
                inner.config.vm.vm.boot_timeout(),
                cgroup,
                &link,
            )
            .await?;
            (booted, "cold")
        }
    };
    // (Every return before the state is written drops `device`, which kills it.)
    let vm::Booted {
        mut qemu,
        client,
        storage_limit,
        address,
        device,
        ..
    } = booted;
    if let Err(refused) = storage_enforceable(start.storage_bytes, storage_limit) {
        if pooled {
            crate::template::refill_soon(inner);
        }
        qemu.kill_and_wait(Duration::from_secs(5)).await;
        return Err(refused.into());
    }
    let mut c = client.clone();
    let started = tokio::time::timeout(patience, c.start(start)).await;
    if pooled {
        crate::template::refill_soon(inner);
    }
    let joined = match joined {
        Some(join) => match join.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        },
        None => Ok(()),
    };
    let failure = match (started, joined) {
        (_, Err(e)) => {
            Some(BackendError::Other(format!("move the clone's qemu into its cgroup: {e}")).into())
        }
        (Ok(Ok(_)), Ok(())) => None,
        // The channel to the guest broke during the call (tonic's "transport error", and
        // once "operation was canceled", each seen in CI on a freshly restored clone): as
        // with no answer, the VM is killed and nothing of the workload reached the host, so
        // it is worth another VM too.
        (Ok(Err(s)), _) if channel_lost(&s) => Some(LaunchFailed {
            error: guest_error("start", s),
            start_unanswered: true,
        }),
        (Ok(Err(s)), _) => Some(guest_error("start", s).into()),
        (Err(_), _) => Some(LaunchFailed {
            // The console's last lines say where the guest was (a panic, a hung task...).
            error: BackendError::Other(format!(
                "start: the guest did not answer within {patience:?}{}",
                qemu::last_words_note(dir)
            )),
            start_unanswered: true,
        }),
    };
    if let Some(e) = failure {
        qemu.kill_and_wait(Duration::from_secs(5)).await;
        return Err(e);
    }
    let state = VmState {
        qemu_pid: qemu.pid,
        qemu_start: qemu.start,
        accel: inner.accel().to_string(),
        cgroup: cgroup.map(|_| id.to_string()),
        env: plan.start.env.clone(),
        cwd: plan.start.cwd.clone(),
        uid: plan.start.uid,
        gid: plan.start.gid,
        deadline_ms: plan.timeout.map(|t| now_ms() + t.as_millis() as u64),
        channel: inner.config.vm.hypervisor.channel,
        vsock_cid: match address {
            Address::Vsock { cid, .. } => cid,
            _ => 0,
        },
        vsock_device: device.as_ref().map(|d| d.process()),
    };
    let written = vm::write_json(dir, vm::STATE_FILE, &state);
    let log = open_log(inner, dir);
    let log = match (written, log) {
        (Ok(()), Ok(log)) => log,
        (Err(e), _) => {
            qemu.kill_and_wait(Duration::from_secs(5)).await;
            return Err(BackendError::Io {
                action: "write",
                path: dir.join(vm::STATE_FILE).display().to_string(),
                source: e,
            }
            .into());
        }
        (_, Err(e)) => {
            qemu.kill_and_wait(Duration::from_secs(5)).await;
            return Err(e.into());
        }
    };
    // The device now outlives this create (the monitor ends it with the VM).
    if let Some(device) = device {
        device.keep();
    }
    let running = Running {
        client,
        qemu: qemu.reference(),
        state,
        stopping: Arc::new(AtomicBool::new(false)),
        paused: Arc::new(AtomicBool::new(false)),
    };
    Ok(Launched {
        qemu,
        running,
        log,
        how,
        pooled,
    })
}

/// The killed server's connection to a paused guest closed while the guest was stopped,
/// and a stopped guest never learns of it: its side of that connection stays open, and
/// would take the next host's greeting for its own. Bytes that are no HTTP/2 frame (a
/// frame header claiming more than the largest frame) end it; the guest then says on its
/// console that it waits for a host, and the next connection is greeted afresh.
async fn end_stale_connection(dir: &Path) {
    use tokio::io::AsyncWriteExt as _;
    let waits = || {
        std::fs::read_to_string(dir.join(qemu::CONSOLE_LOG))
            .unwrap_or_default()
            .matches(warren_guest::WAITING_FOR_HOST)
            .count()
    };
    let before = waits();
    let Ok(mut poke) = tokio::net::UnixStream::connect(dir.join(qemu::CHANNEL_SOCKET)).await else {
        return;
    };
    if poke
        .write_all(b"\xff\xff\xff warren: a new host\n")
        .await
        .is_err()
    {
        return;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while waits() <= before && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A storage limit needs a guest that applies it (`Ping`'s `storage-limit` feature): a
/// stale initramfs would run the sandbox unlimited, so it is refused instead.
fn storage_enforceable(bytes: Option<u64>, guest_applies: bool) -> Result<(), BackendError> {
    match bytes {
        Some(bytes) if !guest_applies => Err(BackendError::Invalid(format!(
            "spec.resources.limits.storage: {bytes} bytes cannot be enforced: this VM's guest \
             predates storage limits (rebuild its initramfs with scripts/vm-assets.sh)"
        ))),
        _ => Ok(()),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A CID for a guest on the host kernel's vsock: random among the 2^32 - 4 a guest may
/// have (qemu fails on one another VM holds, and the create fails with its message).
fn vsock_cid() -> u32 {
    let seed = entropy(Path::new("/dev/urandom"));
    let r = u32::from_le_bytes([seed[0], seed[1], seed[2], seed[3]]);
    3 + r % (u32::MAX - 3)
}

/// 64 bytes from the configured entropy source (the host's urandom if it cannot be read).
/// Opened non-blocking: a source that has nothing to give (a FIFO put in its place) falls
/// back at once instead of holding up the caller, an async worker.
pub(crate) fn entropy(source: &Path) -> Vec<u8> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut seed = vec![0u8; 64];
    let read = |path: &Path, buf: &mut [u8]| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .and_then(|mut f| f.read_exact(buf))
    };
    if source.as_os_str().is_empty() || read(source, &mut seed).is_err() {
        let _ = read(Path::new("/dev/urandom"), &mut seed);
    }
    seed
}

/// What [`run`] needs.
#[derive(Debug)]
pub(crate) struct Watch {
    pub inner: Arc<Inner>,
    pub id: String,
    pub dir: std::path::PathBuf,
    pub qemu: QemuProcess,
    pub running: Running,
    pub log: LogWriter,
    /// Bytes of stdout and stderr already in the log.
    pub offsets: [u64; 2],
    /// The workload is killed this long from now.
    pub timeout: Option<Duration>,
    pub done: watch::Sender<bool>,
}

enum End {
    Exited(proto::ExitStatus),
    QemuGone(String),
    Unhealthy(String),
    /// Its timeout passed and the guest had not ended [`TIMEOUT_KILL_GRACE`] later (it was
    /// paused again, or could not be resumed): qemu is killed.
    TimedOut,
}

/// The monitor's output branch: a request for the stream ended (with the stream, or none
/// yet), or the open stream's next event.
enum Output {
    Opened(Option<tonic::Streaming<proto::OutputEvent>>),
    Event(Option<Result<proto::OutputEvent, tonic::Status>>),
}

/// A request for the guest's output stream under way.
type OutputRequest = std::pin::Pin<
    Box<dyn std::future::Future<Output = Option<tonic::Streaming<proto::OutputEvent>>> + Send>,
>;

/// How long a guest whose timeout passed has to end after its SIGKILL was sent before
/// qemu is killed.
const TIMEOUT_KILL_GRACE: Duration = Duration::from_secs(5);

/// Follows the VM until it ends, then records the end and tears the VM down.
pub(crate) async fn run(w: Watch) {
    let Watch {
        inner,
        id,
        dir,
        mut qemu,
        running,
        log,
        mut offsets,
        timeout,
        done,
    } = w;
    let settings = &inner.config.vm.vm;
    let mut client = running.client.clone();
    let mut output: Option<tonic::Streaming<proto::OutputEvent>> = None;
    let mut opening: Option<OutputRequest> = None;
    let mut health = tokio::time::interval(Duration::from_millis(settings.health_interval_ms));
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    health.tick().await;
    let mut failures = 0u32;
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut timed_out = false;
    // Once the timeout's SIGKILL is sent: when qemu is killed if the guest has not ended.
    let mut kill_at: Option<tokio::time::Instant> = None;
    let end = loop {
        // Asking for the output stream is a branch of the select too, so that a guest that
        // does not answer (paused, hung) cannot keep the monitor from seeing qemu end. The
        // request is kept across turns of the loop: a health tick must not cancel it.
        if output.is_none() && opening.is_none() {
            let request = proto::OutputRequest {
                stdout_offset: offsets[0],
                stderr_offset: offsets[1],
            };
            let mut client = client.clone();
            opening = Some(Box::pin(async move {
                match tokio::time::timeout(Duration::from_secs(5), client.output(request)).await {
                    Ok(Ok(stream)) => Some(stream.into_inner()),
                    // No stream (the guest did not answer): asked again after a pause.
                    _ => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        None
                    }
                }
            }));
        }
        let next_output = async {
            match (&mut output, &mut opening) {
                (Some(stream), _) => Output::Event(stream.next().await),
                (None, Some(request)) => Output::Opened(request.as_mut().await),
                (None, None) => std::future::pending().await,
            }
        };
        let until_deadline = async {
            match deadline {
                _ if timed_out => match kill_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                },
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            how = qemu.wait() => break End::QemuGone(how),
            next = next_output => match next {
                Output::Opened(stream) => {
                    opening = None;
                    output = stream;
                }
                Output::Event(Some(Ok(proto::OutputEvent { event: Some(event) }))) => {
                    if let Some(exit) = record(&log, &mut offsets, event) {
                        break End::Exited(exit);
                    }
                }
                Output::Event(Some(Ok(_))) => {}
                Output::Event(Some(Err(_)) | None) => {
                    output = None;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = health.tick() => {
                if running.paused.load(Ordering::SeqCst) {
                    // A paused guest answers nothing, and is not ill for it.
                    failures = 0;
                    continue;
                }
                let ping = tokio::time::timeout(
                    Duration::from_millis(settings.health_timeout_ms),
                    client.ping(proto::PingRequest {}),
                ).await;
                if matches!(ping, Ok(Ok(_))) {
                    failures = 0;
                } else {
                    failures += 1;
                    debug!(id, failures, "vm: a health ping failed");
                    if failures >= settings.health_failures {
                        break End::Unhealthy(format!(
                            "the guest stopped answering: {failures} health pings in a row failed (each given {} ms)",
                            settings.health_timeout_ms
                        ));
                    }
                }
            }
            () = until_deadline => {
                if timed_out {
                    warn!(id, "vm: the guest did not end after its timeout's SIGKILL; killing qemu");
                    break End::TimedOut;
                }
                timed_out = true;
                // Its time is up paused or not: a paused guest runs again to be killed.
                if let Err(e) = crate::backend::resume(&dir, &running).await {
                    warn!(id, "vm: unpause at the timeout: {e}");
                }
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    client.signal(proto::SignalRequest { signal: libc::SIGKILL }),
                ).await;
                kill_at = Some(tokio::time::Instant::now() + TIMEOUT_KILL_GRACE);
            }
        }
    };
    let stopping = running.stopping.load(Ordering::SeqCst);
    let status = match &end {
        _ if stopping => BackendStatus::Stopped,
        End::Exited(_) if timed_out => BackendStatus::Failed {
            reason: REASON_TIMEOUT.into(),
        },
        End::TimedOut => BackendStatus::Failed {
            reason: REASON_TIMEOUT.into(),
        },
        End::Exited(e) if e.oom_killed => BackendStatus::Failed {
            reason: REASON_OOM.into(),
        },
        End::Exited(e) => BackendStatus::Exited { code: e.code },
        End::QemuGone(how) => BackendStatus::Failed {
            reason: match qemu::panic_line(&dir) {
                Some(line) => format!("the guest kernel panicked: {line}"),
                None => {
                    format!(
                        "the VM ended unexpectedly: qemu {how}{}",
                        qemu::last_words_note(&dir)
                    )
                }
            },
        },
        End::Unhealthy(reason) => BackendStatus::Failed {
            reason: reason.clone(),
        },
    };
    let _ = log.close();
    if let Err(e) = vm::write_json(&dir, vm::EXIT_FILE, &ExitRecord::of(&status)) {
        warn!(id, "vm: write {}: {e}", vm::EXIT_FILE);
    }
    inner.ended(&id, &status);
    if status != BackendStatus::Stopped {
        let _ = inner.events.send(BackendEvent {
            id: id.clone(),
            status: status.clone(),
        });
    }
    // Tear down: a guest that answers powers off (qemu exits by itself), else qemu is killed.
    if qemu.running() {
        if matches!(end, End::Exited(_)) {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                client.shutdown(proto::ShutdownRequest {}),
            )
            .await;
            let _ = tokio::time::timeout(Duration::from_secs(3), qemu.wait()).await;
        }
        if qemu.running() {
            qemu.kill_and_wait(Duration::from_secs(10)).await;
        }
    }
    if let Some(device) = running.state.vsock_device {
        device.kill();
    }
    if let Some(name) = &running.state.cgroup
        && let Some(cg) = inner.cgroup(name)
    {
        let _ = cg.kill_all();
        let _ = cg.remove();
    }
    inner.finished(&id);
    let _ = done.send(true);
}

/// Writes one output event to the log; returns the exit when it is one.
fn record(
    log: &LogWriter,
    offsets: &mut [u64; 2],
    event: proto::output_event::Event,
) -> Option<proto::ExitStatus> {
    use proto::output_event::Event;
    let index = |s: i32| {
        if s == proto::Stream::Stderr as i32 {
            1
        } else {
            0
        }
    };
    let stream = |i: usize| {
        if i == 1 {
            Stream::Stderr
        } else {
            Stream::Stdout
        }
    };
    match event {
        Event::Chunk(chunk) => {
            let i = index(chunk.stream);
            let data = &chunk.data;
            // Skip what the log has already (a resumed stream overlaps), note a gap.
            if chunk.offset > offsets[i] {
                let _ = log.write(
                    Stream::Stderr,
                    format!(
                        "\nwarren: {} bytes of output are missing\n",
                        chunk.offset - offsets[i]
                    )
                    .as_bytes(),
                );
                offsets[i] = chunk.offset;
            }
            let skip = (offsets[i] - chunk.offset).min(data.len() as u64) as usize;
            if skip < data.len() {
                let _ = log.write(stream(i), &data[skip..]);
                offsets[i] += (data.len() - skip) as u64;
            }
            None
        }
        Event::Dropped(d) => {
            let i = index(d.stream);
            let _ = log.write(
                Stream::Stderr,
                format!("\nwarren: {} bytes of {} were dropped by the guest (no host read them in time)\n", d.bytes, stream(i)).as_bytes(),
            );
            offsets[i] = offsets[i].max(d.offset + d.bytes);
            None
        }
        Event::Exit(exit) => Some(exit),
    }
}

/// Bytes of each stream a log already holds: the content of its records, plus the newline
/// each full record stood for.
pub(crate) fn logged_offsets(path: &Path) -> [u64; 2] {
    let mut offsets = [0u64; 2];
    let Ok(records) = warren_runtime::logs::read_logs(path, None, None) else {
        return offsets;
    };
    for r in records {
        let i = if r.stream == Stream::Stderr { 1 } else { 0 };
        offsets[i] += r.content.len() as u64 + u64::from(!r.partial);
    }
    offsets
}

/// A VM found again after a restart.
pub(crate) struct Adopted {
    pub running: Running,
    pub done: watch::Receiver<bool>,
}

/// Takes a running VM back: reconnects to its guest and resumes its monitor where its log
/// ends. `Err` says why it cannot be (then the sandbox is reported Failed, and the caller
/// ends the VM's vsock device).
pub(crate) async fn readopt(
    inner: &Arc<Inner>,
    id: &str,
    dir: &Path,
    state: VmState,
) -> Result<Adopted, String> {
    let Some(mut qemu) = QemuProcess::adopt(state.qemu_pid, state.qemu_start) else {
        return Err(format!(
            "the VM ended while no server watched it{}",
            qemu::last_words_note(dir)
        ));
    };
    // Without its device a vsock guest cannot be reached: no use trying for seconds.
    if let Some(device) = state.vsock_device
        && !device.alive()
    {
        qemu.kill_and_wait(Duration::from_secs(5)).await;
        return Err(format!(
            "the VM's vsock device ended while no server watched it{}",
            qemu::last_words_note(dir)
        ));
    }
    // A VM paused by the server that was killed runs again for the readiness check, and
    // is paused again once adopted.
    let paused = crate::backend::qmp_command(dir, "query-status")
        .await
        .is_ok_and(|s| s["status"] == "paused");
    if paused {
        if let Err(e) = crate::backend::qmp_command(dir, "cont").await {
            qemu.kill_and_wait(Duration::from_secs(5)).await;
            return Err(format!("the VM was paused and could not be resumed: {e}"));
        }
        // (A vsock connection is the guest's own: nothing stale can be left in it.)
        if matches!(state.address(dir), Address::Serial { .. }) {
            end_stale_connection(dir).await;
        }
    }
    let address = state.address(dir);
    // The guest has seen hosts before (unlike a fresh boot's or a clone's): a greeting it
    // missed (taken by a connection it had not yet seen end) is sent again on a new
    // connection, a few times, rather than waited for once.
    let mut tries = 0;
    let client: Client = loop {
        tries += 1;
        match channel::ready(&address, Duration::from_secs(5), || qemu.running()).await {
            Ok(ready) => break ready.client,
            Err(e) if tries >= 4 || !qemu.running() => {
                qemu.kill_and_wait(Duration::from_secs(5)).await;
                return Err(format!(
                    "the VM runs but its guest does not answer ({tries} connections): {e}"
                ));
            }
            Err(e) => debug!(id, tries, "vm: an adopted guest did not answer yet: {e}"),
        }
    };
    let log = open_log(inner, dir).map_err(|e| e.to_string())?;
    let offsets = logged_offsets(&dir.join(vm::LOG_FILE));
    let timeout = state
        .deadline_ms
        .map(|at| Duration::from_millis(at.saturating_sub(now_ms())));
    let running = Running {
        client,
        qemu: qemu.reference(),
        state,
        stopping: Arc::new(AtomicBool::new(false)),
        paused: Arc::new(AtomicBool::new(false)),
    };
    if paused {
        match crate::backend::qmp_command(dir, "stop").await {
            Ok(_) => running.paused.store(true, Ordering::SeqCst),
            Err(e) => warn!(id, "vm: pause an adopted VM again: {e}"),
        }
    }
    let (done_tx, done_rx) = watch::channel(false);
    tokio::spawn(run(Watch {
        inner: Arc::clone(inner),
        id: id.to_string(),
        dir: dir.to_path_buf(),
        qemu,
        running: running.clone(),
        log,
        offsets,
        timeout,
        done: done_tx,
    }));
    Ok(Adopted {
        running,
        done: done_rx,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storage_limit_is_refused_by_a_guest_that_cannot_apply_it() {
        assert!(storage_enforceable(None, false).is_ok());
        assert!(storage_enforceable(None, true).is_ok());
        assert!(storage_enforceable(Some(8 << 20), true).is_ok());
        let err = storage_enforceable(Some(8 << 20), false).unwrap_err();
        assert!(matches!(err, BackendError::Invalid(_)), "{err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with("spec.resources.limits.storage: 8388608 bytes")
                && msg.contains("vm-assets.sh"),
            "{msg}"
        );
    }

    #[test]
    fn a_broken_channel_is_told_from_the_guests_own_errors() {
        assert!(channel_lost(&tonic::Status::unknown("transport error")));
        assert!(channel_lost(&tonic::Status::unavailable(
            "transport error: connection reset"
        )));
        assert!(!channel_lost(&tonic::Status::unknown(
            "exec \"nosuch\": not found"
        )));
        assert!(!channel_lost(&tonic::Status::invalid_argument(
            "transport error"
        )));
        assert!(channel_lost(&tonic::Status::cancelled(
            "operation was canceled"
        )));
        assert!(!channel_lost(&tonic::Status::failed_precondition(
            "operation was canceled"
        )));
    }
}
