//! The `wasm` backend: each sandbox is a WebAssembly program run by wasmtime: a core module
//! that is a WASI preview 1 command (it exports `_start`), or a component that implements
//! the WASI preview 2 `wasi:cli/command` world (it exports `wasi:cli/run@0.2.x`; `run`
//! returning `err` is exit code 1). Both get the same argv, env, preopens, stdio, limits and
//! status reporting; the file's header (or, for text, its first form) says which it is.
//!
//! # Design
//!
//! - **Async wasmtime on the caller's tokio runtime**, not synchronous wasmtime on
//!   `spawn_blocking`. An instance is a task running on a fiber from the pooling allocator,
//!   so 200 concurrent sandboxes on 2 cores cost 200 small stacks rather than 200 OS threads,
//!   a hello world runs without a thread hand-off (create→exit is dominated by instantiation,
//!   ~10 µs), and WASI's stdio and file calls are wasmtime-wasi's native async ones.
//!   CPU-bound guests yield back to tokio at every epoch tick (through
//!   `tokio::task::yield_now`, which lets the worker poll its timer and I/O drivers first), so
//!   they share the workers fairly with each other and with the API; the cost is that a busy
//!   guest can delay other tasks on its worker by about one tick (a test checks that a 1 ms
//!   timer stays under 30 ms late with 4 spinning guests on 2 workers; measured 5–12 ms).
//! - **Epoch tick: 1 ms**, from one thread per backend that parks once no instance has run
//!   for 50 ms (an idle node pays nothing; back-to-back runs find it awake). It bounds three things: how long a busy guest holds a worker,
//!   how late a timeout fires, and how long `stop` waits. Timeouts and stops are tokio timers
//!   and notifications raced against the instance future, which is dropped (wasmtime cancels
//!   the call) at its next yield; this also ends guests parked in a host call.
//! - **Pooling allocator** sized by [`WasmConfig::pool_instances`] (instances, memories,
//!   tables, fiber stacks), with copy-on-write memory images: instantiation is a few µs and
//!   memory is reserved up front, not allocated per sandbox. The first MiB of a memory slot
//!   is reset with `memset` when its instance ends (`madvise` would flush every CPU's TLB). More concurrent instances than
//!   the pool holds are refused at `start` with a capacity error.
//! - **Module cache** keyed by the SHA-256 of the module bytes and a hash of the engine's
//!   compilation settings plus the wasmtime version: compiled once per node, kept in memory
//!   (`InstancePre` or `CommandPre`, ready to instantiate) and on disk as
//!   `<dir>/cache/<key>.cwasm`. Components share the pool's core instances and memories:
//!   one component sandbox takes as many as it has core modules, so a node running
//!   multi-module components fits fewer than `pool_instances` of them (past that,
//!   instantiation fails with wasmtime's pool error as the sandbox's `Failed` reason).
//! - **Limits**: `resources.memory_limit` caps linear memory through a `ResourceLimiter`; a
//!   refused growth traps and the sandbox fails with `MemoryLimit`. `resources.cpu_limit` is
//!   not enforced (a guest gets at most one worker thread; fuel, [`WasmConfig::fuel`], bounds
//!   total work instead).
//! - **Isolation**: the guest sees its argv, the spec's `env` (nothing from the host), an
//!   empty stdin, and only the spec's `mounts` as WASI preopens (read-only ones with read-only
//!   permissions). Stdout and stderr go to the CRI log file as they are written.
//!
//! # argv, working directory, events
//!
//! argv is `command ++ args` when `command` is set (so `command[0]` is argv\[0\], as in a
//! container), else the module's file name followed by `args`. `working_dir` is ignored:
//! WASI preview 1 has no current directory (wasi-libc resolves relative paths against the
//! preopens), and components are given none either. A run that ends by itself sends a [`warren_runtime::BackendEvent`] (`Exited`,
//! or `Failed` with `Timeout`, `MemoryLimit`, `OutOfFuel`, `Trap: …`); a run ended by `stop`
//! or `delete` sends none, since the caller gets the status back.
//!
//! # What survives a restart
//!
//! Nothing runs across a server restart. A sandbox's files are `<dir>/<id>/output.log`,
//! created by its first start, and `status.json`, written when a run ends, so
//! [`warren_runtime::Backend::adopt`] reports how a sandbox ended; one with a log but no
//! status was running when the server died and is `Failed("lost: …")`. That is two metadata
//! operations (the directory, the log) on the way from create to exit, and one after it.

mod backend;
mod bench;
mod cache;
mod engine;
mod run;

pub use backend::WasmBackend;
pub use bench::InstantiateBench;
pub use cache::CacheStats;

use std::time::Duration;

/// Settings for one [`WasmBackend`]; fixed for its lifetime.
#[derive(Debug, Clone, PartialEq)]
pub struct WasmConfig {
    /// Most instances running at once; sizes the pooling allocator.
    pub pool_instances: u32,
    /// Largest linear memory one instance may have, whatever its `memory_limit`.
    pub max_memory_bytes: u64,
    /// Timeout for sandboxes whose spec sets none; `None` lets them run until stopped.
    pub default_timeout: Option<Duration>,
    /// Instructions' worth of fuel per run (deterministic CPU budget); `None` is unmetered.
    /// Running out fails the sandbox with `OutOfFuel`.
    pub fuel: Option<u64>,
    /// Most bytes one sandbox's log file may hold; later output is dropped with a notice, so
    /// a guest cannot fill the disk. `None` is unlimited.
    pub log_max_bytes: Option<u64>,
    /// Most compiled modules kept in memory, ready to instantiate; the least recently used
    /// goes first (at least 1).
    pub cache_modules: usize,
    /// Most bytes of compiled modules kept on disk (`<dir>/cache`); the least recently used
    /// files go first once a compile passes it. `None` is unlimited.
    pub cache_max_bytes: Option<u64>,
}

impl Default for WasmConfig {
    fn default() -> Self {
        WasmConfig {
            pool_instances: 256,
            max_memory_bytes: 256 << 20,
            default_timeout: None,
            fuel: None,
            log_max_bytes: Some(64 << 20),
            cache_modules: 128,
            cache_max_bytes: Some(1 << 30),
        }
    }
}
