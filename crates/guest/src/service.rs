//! The task API (`warren.guest.v1.Guest`) as served by PID 1.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::port::Fd;
use crate::process::{Launch, Next, Output, Reaper, exit_code, pump, spawn_error};
use crate::proto;

/// Where a sandbox's image is mounted and the writable root made over it.
const IMAGE_MOUNT: &str = "/run/warren/image";
const RW_MOUNT: &str = "/run/warren/rw";
const ROOT_MOUNT: &str = "/run/warren/root";
/// How long output may still drain after the workload ended (a background process that
/// inherited the pipes can hold them open).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Guest {
    pub reaper: Arc<Reaper>,
    /// PID 1 of a VM (mounts, hostname, reboot); false when run on a host for tests.
    pid1: bool,
    boot: Instant,
    /// The workload cgroup's directory, when the guest has cgroup2.
    cgroup: Option<PathBuf>,
    state: Mutex<State>,
    output: Arc<Output>,
}

#[derive(Debug, Default)]
struct State {
    sandbox_id: String,
    /// The workload's pid once started.
    workload: Option<i32>,
    /// The root processes run in (an image's overlay), when not the initramfs.
    root: Option<String>,
    /// The `root_device` the root was mounted from.
    root_device: String,
}

impl Guest {
    pub fn new(pid1: bool) -> Guest {
        let cgroup = Path::new(warren_guest::CGROUP_ROOT).join(warren_guest::WORKLOAD_CGROUP);
        Guest {
            reaper: Arc::new(Reaper::default()),
            pid1,
            boot: Instant::now(),
            cgroup: (pid1 && cgroup.join("cgroup.procs").exists()).then_some(cgroup),
            state: Mutex::new(State::default()),
            output: Arc::new(Output::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Mixes the host's `seed` into the kernel's CRNG and reseeds it (a clone shares its
    /// template's RNG state until then).
    fn reseed(&self, seed: &[u8]) -> Result<(), Status> {
        if seed.len() < 32 {
            return Err(Status::invalid_argument(format!(
                "seed: {} bytes is fewer than 32",
                seed.len()
            )));
        }
        if self.pid1 {
            let random = std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/urandom")
                .map_err(|e| Status::internal(format!("open /dev/urandom: {e}")))?;
            use std::os::fd::AsRawFd as _;
            crate::sys::reseed(random.as_raw_fd(), seed)
                .map_err(|e| Status::internal(format!("reseed the kernel's CRNG: {e}")))?;
        }
        Ok(())
    }

    fn set_identity(&self, hostname: &str, id: &str) -> Result<(), Status> {
        if !hostname.is_empty() && self.pid1 {
            nix::unistd::sethostname(hostname).map_err(|e| {
                Status::invalid_argument(format!("hostname: {hostname:?}: {}", e.desc()))
            })?;
        }
        if !id.is_empty() {
            self.state().sandbox_id = id.to_string();
            if self.pid1 {
                std::fs::write(warren_guest::ID_FILE, id).map_err(|e| {
                    Status::internal(format!("write {}: {e}", warren_guest::ID_FILE))
                })?;
            }
        }
        Ok(())
    }

    fn apply_limits(&self, limits: &proto::Limits) -> Result<(), Status> {
        let Some(dir) = &self.cgroup else {
            return Ok(());
        };
        let write = |file: &str, value: String| {
            std::fs::write(dir.join(file), &value)
                .map_err(|e| Status::invalid_argument(format!("cgroup {file} = {value}: {e}")))
        };
        write(
            "memory.max",
            limits
                .memory_bytes
                .map_or("max".to_string(), |b| b.to_string()),
        )?;
        write(
            "pids.max",
            limits.pids.map_or("max".to_string(), |p| p.to_string()),
        )?;
        write(
            "cpu.max",
            match limits.cpu_millis {
                Some(m) => format!("{} 100000", (m * 100).max(1000)),
                None => "max 100000".to_string(),
            },
        )
    }

    fn oom_killed(&self) -> bool {
        let Some(dir) = &self.cgroup else {
            return false;
        };
        std::fs::read_to_string(dir.join("memory.events"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("oom_kill "))
            .any(|n| n.trim().parse::<u64>().is_ok_and(|n| n > 0))
    }

    /// Mounts `device` as the workload's root unless a `Prepare` did; a root mounted from
    /// another device is an error. Only PID 1 mounts (a guest run as a test process keeps the
    /// host's root), but the device is recorded either way, so the check is the same.
    fn ensure_root(&self, device: &str) -> Result<(), Status> {
        // Held while mounting: a second caller waits and finds the root mounted.
        let mut state = self.state();
        if state.root_device == device {
            return Ok(());
        }
        if !state.root_device.is_empty() {
            return Err(Status::failed_precondition(format!(
                "root_device {device:?}: the root is mounted from {:?} already",
                state.root_device
            )));
        }
        if self.pid1 {
            state.root = Some(self.mount_root(device)?);
        }
        state.root_device = device.to_string();
        Ok(())
    }

    /// Limits what the workload can write (the root's upper layer, /tmp and /run: one tmpfs)
    /// to `bytes`, by resizing that tmpfs; the root must be mounted.
    fn limit_storage(&self, bytes: u64) -> Result<(), Status> {
        use nix::mount::{MsFlags, mount};
        if !self.pid1 {
            return Ok(());
        }
        let options = format!("size={bytes}");
        mount(
            None::<&str>,
            RW_MOUNT,
            None::<&str>,
            MsFlags::MS_REMOUNT,
            Some(options.as_str()),
        )
        .map_err(|e| {
            Status::failed_precondition(format!(
                "storage_bytes {bytes}: resize the writable layer: {}",
                e.desc()
            ))
        })
    }

    /// Mounts the image on `device` read-only under a writable overlay (tmpfs upper), with
    /// /proc, /sys and /dev inside, and /tmp and /run as directories of the upper layer's
    /// tmpfs (so that a storage limit covers them too); returns the new root.
    fn mount_root(&self, device: &str) -> Result<String, Status> {
        use nix::mount::{MsFlags, mount};
        let device = &resolve_device(device)?;
        let err = |what: &str, e: nix::Error| {
            Status::failed_precondition(format!("root_device {device:?}: {what}: {}", e.desc()))
        };
        for dir in [IMAGE_MOUNT, RW_MOUNT, ROOT_MOUNT] {
            std::fs::create_dir_all(dir)
                .map_err(|e| Status::internal(format!("mkdir {dir}: {e}")))?;
        }
        mount(
            Some(device.as_str()),
            IMAGE_MOUNT,
            Some("ext4"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| err("mount ext4", e))?;
        mount(
            Some("tmpfs"),
            RW_MOUNT,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| err("mount tmpfs", e))?;
        for (dir, mode) in [
            ("upper", 0o755),
            ("work", 0o755),
            ("tmp", 0o1777),
            ("run", 0o755),
        ] {
            let path = Path::new(RW_MOUNT).join(dir);
            std::fs::create_dir_all(&path)
                .and_then(|()| {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                })
                .map_err(|e| Status::internal(format!("mkdir {}: {e}", path.display())))?;
        }
        let options =
            format!("lowerdir={IMAGE_MOUNT},upperdir={RW_MOUNT}/upper,workdir={RW_MOUNT}/work");
        mount(
            Some("overlay"),
            ROOT_MOUNT,
            Some("overlay"),
            MsFlags::empty(),
            Some(options.as_str()),
        )
        .map_err(|e| err("mount overlay", e))?;
        for dir in ["proc", "sys", "dev", "tmp", "run"] {
            let target = Path::new(ROOT_MOUNT).join(dir);
            let _ = std::fs::create_dir_all(&target);
            let source = Path::new("/").join(dir);
            let source = if dir == "tmp" || dir == "run" {
                Path::new(RW_MOUNT).join(dir)
            } else {
                source
            };
            mount(
                Some(&source),
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| err("bind mount", e))?;
        }
        Ok(ROOT_MOUNT.to_string())
    }

    fn launch(
        &self,
        argv: Vec<String>,
        env: Vec<String>,
        cwd: String,
        uid: u32,
        gid: u32,
    ) -> Launch {
        Launch {
            argv,
            env,
            cwd,
            uid,
            gid,
            root: self.state().root.clone(),
            cgroup_procs: self
                .cgroup
                .as_ref()
                .map(|d| d.join("cgroup.procs").display().to_string()),
        }
    }
}

/// A block device named directly (`/dev/vda`) or by its serial number (`serial:NAME`, as
/// the host sets it on the disk: device names depend on probe order).
fn resolve_device(spec: &str) -> Result<String, Status> {
    let Some(serial) = spec.strip_prefix("serial:") else {
        return Ok(spec.to_string());
    };
    for _ in 0..200 {
        for entry in std::fs::read_dir("/sys/block")
            .into_iter()
            .flatten()
            .flatten()
        {
            let found = std::fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
            if found.trim() == serial {
                return Ok(format!("/dev/{}", entry.file_name().to_string_lossy()));
            }
        }
        // The disk's driver may still be probing right after boot.
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(Status::failed_precondition(format!(
        "root_device {spec:?}: no disk with that serial number"
    )))
}

#[derive(Debug, Clone)]
pub struct GuestService {
    pub guest: Arc<Guest>,
}

pub type ExecStream = BoxStream<proto::ExecOutput>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl proto::guest_server::Guest for GuestService {
    async fn ping(
        &self,
        _req: Request<proto::PingRequest>,
    ) -> Result<Response<proto::PingReply>, Status> {
        let g = &self.guest;
        let state = g.state();
        Ok(Response::new(proto::PingReply {
            uptime_ms: g.boot.elapsed().as_millis() as u64,
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sandbox_id: state.sandbox_id.clone(),
            running: state.workload.is_some() && g.output.exit().is_none(),
            version: warren_guest::VERSION.to_string(),
            features: warren_guest::FEATURES
                .iter()
                .map(|f| f.to_string())
                .collect(),
        }))
    }

    async fn prepare(
        &self,
        req: Request<proto::PrepareRequest>,
    ) -> Result<Response<proto::PrepareReply>, Status> {
        let req = req.into_inner();
        self.guest.reseed(&req.seed)?;
        self.guest.set_identity(&req.hostname, &req.sandbox_id)?;
        if !req.root_device.is_empty() {
            self.guest.ensure_root(&req.root_device)?;
        }
        Ok(Response::new(proto::PrepareReply {}))
    }

    async fn start(
        &self,
        req: Request<proto::StartRequest>,
    ) -> Result<Response<proto::StartReply>, Status> {
        let req = req.into_inner();
        let g = Arc::clone(&self.guest);
        if g.state().workload.is_some() {
            return Err(Status::failed_precondition(
                "the workload was started already",
            ));
        }
        if !req.seed.is_empty() {
            g.reseed(&req.seed)?;
        }
        g.set_identity(&req.hostname, &req.sandbox_id)?;
        g.apply_limits(&req.limits.unwrap_or_default())?;
        if !req.root_device.is_empty() {
            g.ensure_root(&req.root_device)?;
            if let Some(bytes) = req.storage_bytes {
                g.limit_storage(bytes)?;
            }
        }
        let argv0 = req.argv.first().cloned().unwrap_or_default();
        let program = g
            .launch(req.argv, req.env, req.cwd, req.uid, req.gid)
            .program(false)?;
        let stdin = if req.stdin.is_empty() {
            crate::process::null()?
        } else {
            let path = std::env::temp_dir().join(format!("warren-stdin-{}", std::process::id()));
            std::fs::write(&path, &req.stdin)
                .map_err(|e| Status::internal(format!("write {}: {e}", path.display())))?;
            let file = std::fs::File::open(&path)
                .map_err(|e| Status::internal(format!("open {}: {e}", path.display())))?;
            let _ = std::fs::remove_file(&path);
            OwnedFd::from(file)
        };
        let (stdout, child_stdout) = crate::process::pipe(false)?;
        let (stderr, child_stderr) = crate::process::pipe(false)?;
        let (pid, status) = g
            .reaper
            .spawn(&program, [&stdin, &child_stdout, &child_stderr])
            .map_err(|e| spawn_error(&argv0, &e))?;
        // The child's ends close here, or the pipes never end.
        drop((stdin, child_stdout, child_stderr));
        g.state().workload = Some(pid as i32);
        let output = Arc::clone(&g.output);
        tokio::spawn(pump(stdout, Arc::clone(&output), 0));
        tokio::spawn(pump(stderr, Arc::clone(&output), 1));
        tokio::spawn(async move {
            let status = status.await;
            let (code, signal) = match &status {
                Ok(s) => exit_code(s),
                Err(_) => (128 + libc::SIGKILL, libc::SIGKILL),
            };
            let deadline = tokio::time::Instant::now() + DRAIN_AFTER_EXIT;
            let mut changed = output.subscribe();
            while !output.closed() && tokio::time::Instant::now() < deadline {
                let _ = tokio::time::timeout_at(deadline, changed.changed()).await;
            }
            output.set_exit(proto::ExitStatus {
                code,
                signal,
                oom_killed: g.oom_killed(),
            });
        });
        Ok(Response::new(proto::StartReply { pid }))
    }

    type OutputStream = BoxStream<proto::OutputEvent>;

    async fn output(
        &self,
        req: Request<proto::OutputRequest>,
    ) -> Result<Response<Self::OutputStream>, Status> {
        let req = req.into_inner();
        let output = Arc::clone(&self.guest.output);
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut changed = output.subscribe();
            let mut at = [req.stdout_offset, req.stderr_offset];
            loop {
                changed.borrow_and_update();
                match output.next(at) {
                    Next::Events(events, next) => {
                        at = next;
                        for e in events {
                            if tx.send(Ok(e)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Next::Done(exit) => {
                        let _ = tx
                            .send(Ok(proto::OutputEvent {
                                event: Some(proto::output_event::Event::Exit(exit)),
                            }))
                            .await;
                        return;
                    }
                    Next::Wait => {
                        tokio::select! {
                            r = changed.changed() => if r.is_err() { return },
                            () = tx.closed() => return,
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn signal(
        &self,
        req: Request<proto::SignalRequest>,
    ) -> Result<Response<proto::SignalReply>, Status> {
        let signal = req.into_inner().signal;
        let sig = nix::sys::signal::Signal::try_from(signal)
            .map_err(|_| Status::invalid_argument(format!("signal: {signal} is not a signal")))?;
        let pid = self
            .guest
            .state()
            .workload
            .ok_or_else(|| Status::failed_precondition("no workload was started"))?;
        if self.guest.output.exit().is_some() {
            return Ok(Response::new(proto::SignalReply {}));
        }
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(Response::new(proto::SignalReply {})),
            Err(e) => Err(Status::internal(format!("kill {pid} {sig}: {}", e.desc()))),
        }
    }

    async fn set_limits(
        &self,
        req: Request<proto::Limits>,
    ) -> Result<Response<proto::SetLimitsReply>, Status> {
        self.guest.apply_limits(&req.into_inner())?;
        Ok(Response::new(proto::SetLimitsReply {}))
    }

    type ExecStream = BoxStream<proto::ExecOutput>;

    async fn exec(
        &self,
        req: Request<Streaming<proto::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let mut input = req.into_inner();
        let start = match input.next().await {
            Some(Ok(proto::ExecInput {
                input: Some(proto::exec_input::Input::Start(start)),
            })) => start,
            Some(Err(e)) => return Err(e),
            _ => {
                return Err(Status::invalid_argument(
                    "exec: the first message must be `start`",
                ));
            }
        };
        crate::exec::run(Arc::clone(&self.guest), start, input)
    }

    async fn processes(
        &self,
        _req: Request<proto::ProcessesRequest>,
    ) -> Result<Response<proto::ProcessesReply>, Status> {
        let processes = tokio::task::spawn_blocking(processes)
            .await
            .map_err(|e| Status::internal(format!("list processes: {e}")))??;
        Ok(Response::new(proto::ProcessesReply { processes }))
    }

    async fn shutdown(
        &self,
        _req: Request<proto::ShutdownRequest>,
    ) -> Result<Response<proto::ShutdownReply>, Status> {
        let pid1 = self.guest.pid1;
        tokio::spawn(async move {
            // Let the reply leave first.
            tokio::time::sleep(Duration::from_millis(20)).await;
            if pid1 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(-1),
                    nix::sys::signal::Signal::SIGKILL,
                );
                crate::sys::reboot();
            }
            std::process::exit(0);
        });
        Ok(Response::new(proto::ShutdownReply {}))
    }
}

/// At most this many processes are listed, each command line at most this long.
const MAX_PROCESSES: usize = 4096;
const MAX_COMMAND: usize = 4096;

/// Every descendant of this process (in a VM, of PID 1: every process of the workload's
/// and of `Exec`), as `/proc` shows them; a process that ends meanwhile is left out.
fn processes() -> Result<Vec<proto::GuestProcess>, Status> {
    let all = procfs::process::all_processes()
        .map_err(|e| Status::internal(format!("read /proc: {e}")))?;
    let stats: Vec<(procfs::process::Process, procfs::process::Stat)> = all
        .flatten()
        .filter_map(|p| {
            let stat = p.stat().ok()?;
            Some((p, stat))
        })
        .collect();
    // Descendants: from this process down its children.
    let me = std::process::id() as i32;
    let mut children: std::collections::HashMap<i32, Vec<i32>> = Default::default();
    for (_, stat) in &stats {
        children.entry(stat.ppid).or_default().push(stat.pid);
    }
    let mut wanted = std::collections::HashSet::new();
    let mut next = vec![me];
    while let Some(pid) = next.pop() {
        for &child in children.get(&pid).into_iter().flatten() {
            if wanted.insert(child) {
                next.push(child);
            }
        }
    }
    let ticks = procfs::ticks_per_second().max(1);
    let page = procfs::page_size();
    let mut list: Vec<proto::GuestProcess> = stats
        .iter()
        .filter(|(_, stat)| wanted.contains(&stat.pid))
        .take(MAX_PROCESSES)
        .map(|(process, stat)| {
            // Read as bytes: arguments need not be UTF-8.
            let raw = std::fs::read(format!("/proc/{}/cmdline", stat.pid)).unwrap_or_default();
            let args: Vec<String> = raw
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let mut command = if args.is_empty() {
                format!("[{}]", stat.comm)
            } else {
                args.join(" ")
            };
            if command.len() > MAX_COMMAND {
                let mut end = MAX_COMMAND;
                while !command.is_char_boundary(end) {
                    end -= 1;
                }
                command.truncate(end);
            }
            proto::GuestProcess {
                pid: stat.pid as u32,
                ppid: stat.ppid as u32,
                uid: process.status().map(|s| s.ruid).unwrap_or_default(),
                state: stat.state.to_string(),
                cpu_ns: (stat.utime + stat.stime).saturating_mul(1_000_000_000) / ticks,
                rss_bytes: stat.rss.saturating_mul(page),
                command,
            }
        })
        .collect();
    list.sort_by_key(|p| p.pid);
    Ok(list)
}

/// What exec needs of the guest.
impl Guest {
    pub fn exec_launch(&self, start: &proto::ExecStart) -> Launch {
        self.launch(
            start.argv.clone(),
            start.env.clone(),
            start.cwd.clone(),
            start.uid,
            start.gid,
        )
    }
}

/// Reads `reader` to its end, sending each piece as `wrap(bytes)`.
pub async fn forward(
    mut reader: impl tokio::io::AsyncRead + Unpin,
    tx: mpsc::Sender<Result<proto::ExecOutput, Status>>,
    wrap: fn(Vec<u8>) -> proto::exec_output::Output,
) {
    let mut buf = vec![0u8; 32 << 10];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let msg = proto::ExecOutput {
                    output: Some(wrap(buf[..n].to_vec())),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Feeds the exec's input messages to the process: stdin, its end, terminal resizes.
pub async fn feed(
    mut input: Streaming<proto::ExecInput>,
    mut stdin: Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>,
    tty: Option<Fd>,
) {
    // The last byte given to the process, to tell an unfinished line.
    let mut last = None;
    while let Some(Ok(msg)) = input.next().await {
        match msg.input {
            Some(proto::exec_input::Input::Stdin(bytes)) => {
                if let Some(w) = &mut stdin {
                    if w.write_all(&bytes).await.is_err() {
                        stdin = None;
                    } else if let Some(&b) = bytes.last() {
                        last = Some(b);
                    }
                }
            }
            Some(proto::exec_input::Input::CloseStdin(_)) => {
                if let Some(tty) = &tty {
                    // End of file on a terminal is its EOF character (^D) at a line
                    // start: after an unfinished line, a first one hands the line over.
                    let eof = nix::sys::termios::tcgetattr(tty.0.get_ref().as_fd())
                        .map(|t| {
                            t.control_chars
                                [nix::sys::termios::SpecialCharacterIndices::VEOF as usize]
                        })
                        .ok()
                        .filter(|&c| c != 0)
                        .unwrap_or(4);
                    let unfinished = last.is_some_and(|b| b != b'\n' && b != b'\r' && b != eof);
                    let mut t = tty.clone();
                    let _ = t
                        .write_all(&[eof, eof][..if unfinished { 2 } else { 1 }])
                        .await;
                }
                stdin = None;
            }
            Some(proto::exec_input::Input::Resize(r)) => {
                if let Some(tty) = &tty {
                    let _ = crate::sys::set_window_size(
                        tty.0.get_ref().as_fd(),
                        r.rows as u16,
                        r.cols as u16,
                    );
                }
            }
            _ => {}
        }
    }
}
