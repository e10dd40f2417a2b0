//! One run of one instance: its WASI context, limits, output, and how it ended.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use warren_runtime::BackendStatus;
use warren_runtime::logs::{LogWriter, Stream};
use wasmtime::{Engine, InstancePre, Linker, ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

/// Largest table a guest may grow to, in elements (the pool's own default is 20,000).
const MAX_TABLE_ELEMENTS: usize = 20_000;

pub(crate) const REASON_TIMEOUT: &str = "Timeout";
pub(crate) const REASON_MEMORY: &str = "MemoryLimit";
pub(crate) const REASON_FUEL: &str = "OutOfFuel";

/// A store's data.
pub(crate) struct Ctx {
    wasi: WasiP1Ctx,
    limiter: MemoryLimiter,
}

pub(crate) fn linker(engine: &Engine) -> wasmtime::Result<Linker<Ctx>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |ctx: &mut Ctx| &mut ctx.wasi)?;
    Ok(linker)
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

/// Everything one run needs, taken from the sandbox when it starts.
pub(crate) struct Job {
    pub(crate) pre: InstancePre<Ctx>,
    pub(crate) argv: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    /// (host, guest, read_only)
    pub(crate) mounts: Vec<(PathBuf, String, bool)>,
    pub(crate) memory_limit: usize,
    pub(crate) fuel: Option<u64>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) log: Arc<LogWriter>,
    pub(crate) stop: Arc<Notify>,
}

/// Runs the job to its end: exit, trap, timeout, or `stop`. The log is closed after.
pub(crate) async fn run(job: Job) -> BackendStatus {
    let status = run_inner(&job).await;
    let _ = job.log.close();
    status
}

async fn run_inner(job: &Job) -> BackendStatus {
    let deadline = job.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut store = match new_store(job) {
        Ok(store) => store,
        Err(reason) => return BackendStatus::Failed { reason },
    };
    let result = {
        let call = call_start(&job.pre, &mut store);
        tokio::pin!(call);
        let timeout = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        // The instance yields at every epoch tick, so these branches are polled at least
        // that often; when one wins, dropping `call` cancels the guest where it stands.
        tokio::select! {
            biased;
            _ = job.stop.notified() => return BackendStatus::Stopped,
            _ = timeout => return BackendStatus::Failed { reason: REASON_TIMEOUT.into() },
            result = &mut call => result,
        }
    };
    classify(result, store.data().limiter.hit)
}

fn new_store(job: &Job) -> Result<Store<Ctx>, String> {
    let mut wasi = WasiCtxBuilder::new();
    wasi.args(&job.argv)
        .envs(&job.env)
        .stdout(LogOutput {
            log: Arc::clone(&job.log),
            stream: Stream::Stdout,
        })
        .stderr(LogOutput {
            log: Arc::clone(&job.log),
            stream: Stream::Stderr,
        })
        // File calls on local disks are short: run them on the worker rather than hand each
        // one to the blocking pool.
        .allow_blocking_current_thread(true);
    for (host, guest, read_only) in &job.mounts {
        let perms = if *read_only {
            FsPerms::ReadOnly
        } else {
            FsPerms::ReadWrite
        };
        wasi.preopened_dir(host, guest, perms)
            .map_err(|e| format!("Error: cannot open mount {}: {e:#}", host.display()))?;
    }
    let ctx = Ctx {
        wasi: wasi.build_p1(),
        limiter: MemoryLimiter {
            limit: job.memory_limit,
            hit: false,
        },
    };
    let mut store = Store::new(job.pre.module().engine(), ctx);
    store.limiter(|ctx| &mut ctx.limiter);
    store.set_epoch_deadline(1);
    // Yield at every tick through tokio's `yield_now`, not a plain self-wake: tokio defers
    // the wake until its worker has polled the timer and I/O drivers, so busy guests cannot
    // starve timers (with a self-wake, drivers were polled only every 61 task polls, ~61 ms).
    store.epoch_deadline_callback(|_| {
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

async fn call_start(pre: &InstancePre<Ctx>, store: &mut Store<Ctx>) -> wasmtime::Result<()> {
    let instance = pre.instantiate_async(&mut *store).await?;
    let start = instance.get_typed_func::<(), ()>(&mut *store, "_start")?;
    start.call_async(&mut *store, ()).await
}

/// Maps how `_start` returned to a status.
fn classify(result: wasmtime::Result<()>, memory_limit_hit: bool) -> BackendStatus {
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
        None => format!("Error: {error:#}"),
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
