//! One run of one instance: its WASI context, limits, output, and how it ended.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use warren_runtime::logs::{LogWriter, Stream};
use warren_runtime::{BackendStatus, Stdin};
use warren_spec::{NetworkMode, Policy};
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, InstancePre, Linker, ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// Largest table a guest may grow to, in elements (the pool's own default is 20,000).
const MAX_TABLE_ELEMENTS: usize = 20_000;

pub(crate) const REASON_TIMEOUT: &str = "Timeout";
pub(crate) const REASON_MEMORY: &str = "MemoryLimit";
pub(crate) const REASON_FUEL: &str = "OutOfFuel";

/// A store's data: the WASI state (`WasiP1Ctx` for a core module, [`P2`] for a component)
/// and the memory limiter.
pub(crate) struct Ctx<W> {
    wasi: W,
    limiter: MemoryLimiter,
}

/// WASI preview 2 state of a component's store.
pub(crate) struct P2 {
    ctx: WasiCtx,
    table: ResourceTable,
}

impl P2 {
    pub(crate) fn new(wasi: &mut WasiCtxBuilder) -> Self {
        P2 {
            ctx: wasi.build(),
            table: ResourceTable::new(),
        }
    }
}

impl WasiView for Ctx<P2> {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi.ctx,
            table: &mut self.wasi.table,
        }
    }
}

/// A loaded program, ready to instantiate; cheap to clone.
#[derive(Clone)]
pub(crate) enum Program {
    /// A core module that is a WASI preview 1 command.
    Module(InstancePre<Ctx<WasiP1Ctx>>),
    /// A component that implements `wasi:cli/command` (WASI preview 2).
    Component(CommandPre<Ctx<P2>>),
}

impl Program {
    fn engine(&self) -> &Engine {
        match self {
            Program::Module(pre) => pre.module().engine(),
            Program::Component(pre) => pre.instance_pre().engine(),
        }
    }
}

/// The host functions guests may import: WASI preview 1 for modules, preview 2 for
/// components.
pub(crate) struct Linkers {
    pub(crate) module: Linker<Ctx<WasiP1Ctx>>,
    pub(crate) component: wasmtime::component::Linker<Ctx<P2>>,
}

pub(crate) fn linkers(engine: &Engine) -> wasmtime::Result<Linkers> {
    let mut module = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut module, |ctx: &mut Ctx<WasiP1Ctx>| &mut ctx.wasi)?;
    let mut component = wasmtime::component::Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut component)?;
    Ok(Linkers { module, component })
}

/// Caps linear memory and remembers that it did, so a failure can be told apart from other
/// traps whatever the guest does next.
struct MemoryLimiter {
    limit: usize,
    hit: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.hit = true;
            wasmtime::bail!(
                "memory limit of {} bytes reached (growing to {desired})",
                self.limit
            );
        }
        // Past the module's own declared maximum: `memory.grow` returns -1, as the spec says.
        Ok(maximum.is_none_or(|max| desired <= max))
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS && maximum.is_none_or(|max| desired <= max))
    }
}

/// A host directory the guest sees at `guest`.
#[derive(Debug)]
pub(crate) struct Mount {
    /// Opened when the run was set up, and checked against the policy then: the run
    /// preopens this very directory (through `/proc/self/fd`), whatever the path names now.
    pub(crate) dir: std::io::Result<std::fs::File>,
    /// The path the spec named, for messages.
    pub(crate) host: PathBuf,
    pub(crate) guest: String,
    pub(crate) read_only: bool,
}

/// Opens a directory to preopen (not a FIFO or device: `O_DIRECTORY` refuses those without
/// blocking).
pub(crate) fn open_dir(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)
}

/// Where an open directory is, as the kernel names it (`None` when it cannot say, e.g.
/// without /proc).
pub(crate) fn opened_path(dir: &std::fs::File) -> Option<PathBuf> {
    use std::os::fd::AsRawFd as _;
    std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd())).ok()
}

/// Everything one run needs, taken from the sandbox when it starts.
pub(crate) struct Job {
    pub(crate) program: Program,
    pub(crate) argv: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) mounts: Vec<Mount>,
    /// Read by the guest on fd 0, then end of file; `None`: an empty stdin.
    pub(crate) stdin: Option<Stdin>,
    /// Sockets: without a policy, or with network `none`, the guest connects nowhere
    /// (WASI's default); `loopback` and `egress` open what they list.
    pub(crate) policy: Option<Arc<Policy>>,
    pub(crate) memory_limit: usize,
    pub(crate) fuel: Option<u64>,
    pub(crate) timeout: Option<Duration>,
    /// Where stdout and stderr go; `None` discards them (benchmarks).
    pub(crate) log: Option<Arc<LogWriter>>,
    pub(crate) stop: Arc<Notify>,
    /// True while the sandbox is paused: the guest waits at its next epoch tick.
    pub(crate) paused: tokio::sync::watch::Receiver<bool>,
}

/// Runs the job to its end: exit, trap, timeout, or `stop`. The log is closed after.
pub(crate) async fn run(job: Job) -> BackendStatus {
    let status = run_inner(&job).await;
    if let Some(log) = &job.log {
        let _ = log.close();
    }
    status
}

async fn run_inner(job: &Job) -> BackendStatus {
    let deadline = job.timeout.map(|t| tokio::time::Instant::now() + t);
    match &job.program {
        Program::Module(pre) => {
            let mut store = match new_store(job, |wasi| wasi.build_p1()) {
                Ok(store) => store,
                Err(reason) => return BackendStatus::Failed { reason },
            };
            let result = race(job, deadline, call_start(pre, &mut store)).await;
            ended(result, store.data().limiter.hit)
        }
        Program::Component(pre) => {
            let mut store = match new_store(job, P2::new) {
                Ok(store) => store,
                Err(reason) => return BackendStatus::Failed { reason },
            };
            let result = race(job, deadline, call_run(pre, &mut store)).await;
            ended(result, store.data().limiter.hit)
        }
    }
}

/// Races the guest against `stop` and the deadline; `Err` is how a lost race ended.
async fn race(
    job: &Job,
    deadline: Option<tokio::time::Instant>,
    call: impl Future<Output = wasmtime::Result<()>>,
) -> Result<wasmtime::Result<()>, BackendStatus> {
    tokio::pin!(call);
    let timeout = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    // The instance yields at every epoch tick, so these branches are polled at least that
    // often; when one wins, dropping `call` cancels the guest where it stands.
    tokio::select! {
        biased;
        _ = job.stop.notified() => Err(BackendStatus::Stopped),
        _ = timeout => Err(BackendStatus::Failed { reason: REASON_TIMEOUT.into() }),
        result = &mut call => Ok(result),
    }
}

fn ended(
    result: Result<wasmtime::Result<()>, BackendStatus>,
    memory_limit_hit: bool,
) -> BackendStatus {
    match result {
        Ok(result) => classify(result, memory_limit_hit),
        Err(status) => status,
    }
}

/// The WASI context every run gets (argv, env, stdio to the log, mounts), finished by
/// `build` into the store data of the program's kind.
pub(crate) fn new_store<W>(
    job: &Job,
    build: impl FnOnce(&mut WasiCtxBuilder) -> W,
) -> Result<Store<Ctx<W>>, String> {
    let mut wasi = WasiCtxBuilder::new();
    wasi.args(&job.argv)
        .envs(&job.env)
        // File calls on local disks are short: run them on the worker rather than hand each
        // one to the blocking pool.
        .allow_blocking_current_thread(true);
    if let Some(stdin) = &job.stdin {
        wasi.stdin(MemoryInputPipe::new(Bytes::from_owner(Arc::clone(
            &stdin.0,
        ))));
    }
    if let Some(log) = &job.log {
        wasi.stdout(LogOutput {
            log: Arc::clone(log),
            stream: Stream::Stdout,
        })
        .stderr(LogOutput {
            log: Arc::clone(log),
            stream: Stream::Stderr,
        });
    }
    match job.policy.as_ref().map(|p| (p, p.network_mode())) {
        None | Some((_, None)) => {}
        Some((_, Some(NetworkMode::None))) => {
            wasi.allow_tcp(false)
                .allow_udp(false)
                .allow_ip_name_lookup(false);
        }
        Some((policy, Some(_))) => {
            let policy = Arc::clone(policy);
            wasi.socket_addr_check(move |addr, _use| {
                let allowed = policy.connect_allowed(addr.ip(), addr.port());
                Box::pin(async move { allowed })
            });
        }
    }
    for mount in &job.mounts {
        let perms = if mount.read_only {
            FsPerms::ReadOnly
        } else {
            FsPerms::ReadWrite
        };
        let opened = |e: &dyn std::fmt::Display| {
            format!("Error: cannot open mount {}: {e:#}", mount.host.display())
        };
        let dir = mount.dir.as_ref().map_err(|e| opened(e))?;
        // The magic link reopens the directory the descriptor holds, not a path.
        let held = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(dir));
        wasi.preopened_dir(&held, &mount.guest, perms)
            .map_err(|e| opened(&e))?;
    }
    let ctx = Ctx {
        wasi: build(&mut wasi),
        limiter: MemoryLimiter {
            limit: job.memory_limit,
            hit: false,
        },
    };
    let mut store = Store::new(job.program.engine(), ctx);
    store.limiter(|ctx| &mut ctx.limiter);
    store.set_epoch_deadline(1);
    // Yield at every tick through tokio's `yield_now`, not a plain self-wake: tokio defers
    // the wake until its worker has polled the timer and I/O drivers, so busy guests cannot
    // starve timers (with a self-wake, drivers were polled only every 61 task polls, ~61 ms).
    // A paused sandbox's guest waits at its tick until it is resumed (its task gets no CPU;
    // `stop` and the timeout still end it: they race the call, see `race`).
    let paused = job.paused.clone();
    store.epoch_deadline_callback(move |_| {
        if *paused.borrow() {
            let mut paused = paused.clone();
            return Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(async move {
                    let _ = paused.wait_for(|p| !*p).await;
                }),
            ));
        }
        Ok(UpdateDeadline::YieldCustom(
            1,
            Box::pin(tokio::task::yield_now()),
        ))
    });
    if let Some(fuel) = job.fuel {
        store
            .set_fuel(fuel)
            .map_err(|e| format!("Error: cannot set fuel: {e:#}"))?;
    }
    Ok(store)
}

pub(crate) async fn call_start(
    pre: &InstancePre<Ctx<WasiP1Ctx>>,
    store: &mut Store<Ctx<WasiP1Ctx>>,
) -> wasmtime::Result<()> {
    let instance = pre.instantiate_async(&mut *store).await?;
    let start = instance.get_typed_func::<(), ()>(&mut *store, "_start")?;
    start.call_async(&mut *store, ()).await
}

/// Runs a component's `wasi:cli/run.run`; its `err` is exit code 1, as in wasmtime's CLI.
pub(crate) async fn call_run(
    pre: &CommandPre<Ctx<P2>>,
    store: &mut Store<Ctx<P2>>,
) -> wasmtime::Result<()> {
    let command = pre.instantiate_async(&mut *store).await?;
    match command.wasi_cli_run().call_run(&mut *store).await? {
        Ok(()) => Ok(()),
        Err(()) => Err(I32Exit(1).into()),
    }
}

/// Maps how `_start` (or `run`) returned to a status.
pub(crate) fn classify(result: wasmtime::Result<()>, memory_limit_hit: bool) -> BackendStatus {
    let Err(error) = result else {
        return BackendStatus::Exited { code: 0 };
    };
    if let Some(exit) = error.downcast_ref::<I32Exit>() {
        return BackendStatus::Exited { code: exit.0 };
    }
    if memory_limit_hit {
        return BackendStatus::Failed {
            reason: REASON_MEMORY.into(),
        };
    }
    let reason = match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => REASON_FUEL.to_string(),
        Some(trap) => {
            let text = trap.to_string();
            format!(
                "Trap: {}",
                text.strip_prefix("wasm trap: ").unwrap_or(&text)
            )
        }
        // The chain without the wasm backtrace wasmtime adds as a context (a line per
        // frame): a reason is one line.
        None => {
            let backtrace = error
                .downcast_ref::<wasmtime::WasmBacktrace>()
                .map(ToString::to_string);
            // A cause its context already ends with is said once (wasi's errors repeat it).
            let mut text = String::new();
            for part in error.chain().map(ToString::to_string) {
                if part.is_empty() || Some(&part) == backtrace.as_ref() || text.ends_with(&part) {
                    continue;
                }
                if !text.is_empty() {
                    text.push_str(": ");
                }
                text.push_str(&part);
            }
            format!("Error: {text}")
        }
    };
    BackendStatus::Failed { reason }
}

/// Stdout or stderr of a guest, written to the sandbox's log as it comes.
struct LogOutput {
    log: Arc<LogWriter>,
    stream: Stream,
}

impl IsTerminal for LogOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LogSink {
            log: Arc::clone(&self.log),
            stream: self.stream,
        })
    }

    // Writes straight to the log: the default adapter would add a task and a buffer per
    // stream, and output could still be in flight when the guest exits.
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LogSink {
            log: Arc::clone(&self.log),
            stream: self.stream,
        })
    }
}

struct LogSink {
    log: Arc<LogWriter>,
    stream: Stream,
}

impl LogSink {
    fn write_bytes(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.log
            .write(self.stream, bytes)
            .map_err(std::io::Error::other)
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for LogSink {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.write_bytes(&bytes)
            .map_err(|e| StreamError::LastOperationFailed(e.into()))
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogSink {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LogSink {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(self.write_bytes(buf).map(|()| buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
