//! The wasmtime engine and the thread that advances its epoch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::WasmConfig;

/// One epoch tick; see the crate docs for why 1 ms.
pub(crate) const TICK: Duration = Duration::from_millis(1);

/// How long the ticker keeps ticking after the last instance ended before it parks. Runs
/// that follow each other closely (a function platform's steady state) then find it awake
/// and pay no wake-up; an idle node still costs nothing after this.
const LINGER: Duration = Duration::from_millis(50);

/// Bytes of a memory slot reset with `memset` instead of `madvise` when an instance ends:
/// `madvise` flushes every CPU's TLB (an IPI to each, costly in a VM), and a short-lived
/// guest dirties only a few pages of its first MiB.
const MEMORY_KEEP_RESIDENT: usize = 1 << 20;
const TABLE_KEEP_RESIDENT: usize = 64 << 10;
/// Decommits past the resident part are flushed together, several instances at a time.
const DECOMMIT_BATCH: usize = 16;

/// Guest stack (wasm frames); the fiber adds room for host calls on top.
const MAX_WASM_STACK: usize = 512 << 10;
const ASYNC_STACK: usize = MAX_WASM_STACK + (256 << 10);

pub(crate) fn build_engine(config: &WasmConfig) -> wasmtime::Result<Engine> {
    let max_memory = usize::try_from(config.max_memory_bytes).unwrap_or(usize::MAX);
    let mut pool = PoolingAllocationConfig::new();
    pool.total_core_instances(config.pool_instances)
        .total_memories(config.pool_instances)
        .total_tables(config.pool_instances)
        .total_stacks(config.pool_instances)
        // A component sandbox holds one component instance plus its core instances and
        // memories, which come out of the totals above: a node running components fits
        // fewer of them than `pool_instances` (instantiation then fails with a pool error).
        .total_component_instances(config.pool_instances)
        .max_memory_size(max_memory)
        .linear_memory_keep_resident(MEMORY_KEEP_RESIDENT.min(max_memory))
        .table_keep_resident(TABLE_KEEP_RESIDENT)
        .decommit_batch_size(DECOMMIT_BATCH);
    let mut c = Config::new();
    c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .memory_init_cow(true)
        .epoch_interruption(true)
        .max_wasm_stack(MAX_WASM_STACK)
        .async_stack_size(ASYNC_STACK)
        .consume_fuel(config.fuel.is_some());
    Engine::new(&c)
}

/// Advances the engine's epoch every [`TICK`] while an instance runs (and for [`LINGER`]
/// after the last one), and parks otherwise.
/// Stopped and joined on drop.
#[derive(Debug)]
pub(crate) struct Ticker {
    shared: Arc<TickShared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct TickShared {
    running: AtomicUsize,
    /// The thread is parked (or about to park): `try_enter` clears it and wakes the thread.
    parked: AtomicBool,
    stop: AtomicBool,
    /// Epoch increments so far.
    ticks: AtomicU64,
}

/// Held by a running instance; the ticker ticks while any exists.
#[derive(Debug)]
pub(crate) struct Running {
    shared: Arc<TickShared>,
}

impl Ticker {
    pub(crate) fn start(engine: Engine) -> std::io::Result<Self> {
        let shared = Arc::new(TickShared::default());
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                let mut idle_since: Option<std::time::Instant> = None;
                while !s.stop.load(Ordering::Acquire) {
                    if s.running.load(Ordering::Acquire) == 0 {
                        let since = *idle_since.get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() >= LINGER {
                            s.parked.store(true, Ordering::SeqCst);
                            // Re-checked after announcing the park: an enter in between
                            // either sees `parked` and unparks us, or is seen here.
                            if s.running.load(Ordering::SeqCst) == 0 {
                                // Woken by `enter` or drop; the timeout guards a lost wake-up.
                                std::thread::park_timeout(Duration::from_millis(200));
                            }
                            // An enter clears `parked` when it wakes us: linger again after
                            // its instance. After a timeout (or a spurious wake-up) with
                            // nothing running, park again at once: an idle node must not
                            // tick (it did, 50 ms of every 250, before this).
                            let woken = !s.parked.swap(false, Ordering::SeqCst);
                            if woken || s.running.load(Ordering::SeqCst) > 0 {
                                idle_since = None;
                            }
                            continue;
                        }
                    } else {
                        idle_since = None;
                    }
                    std::thread::sleep(TICK);
                    engine.increment_epoch();
                    s.ticks.fetch_add(1, Ordering::Relaxed);
                }
            })?;
        Ok(Ticker {
            shared,
            thread: Some(thread),
        })
    }

    /// Marks one more instance running, waking the ticker if it was parked; `None` when
    /// `max` are running already.
    pub(crate) fn try_enter(&self, max: usize) -> Option<Running> {
        let before = self
            .shared
            .running
            // SeqCst, paired with the ticker's store of `parked` then load of `running`.
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        if before == 0
            && self.shared.parked.swap(false, Ordering::SeqCst)
            && let Some(thread) = &self.thread
        {
            thread.thread().unpark();
        }
        Some(Running {
            shared: Arc::clone(&self.shared),
        })
    }

    #[cfg(test)]
    pub(crate) fn running(&self) -> usize {
        self.shared.running.load(Ordering::Acquire)
    }

    #[cfg(test)]
    fn ticks(&self) -> u64 {
        self.shared.ticks.load(Ordering::Relaxed)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shared.running.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            // The loop checks `stop` at least every tick: this waits ~1 ms at most.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_only_while_running_and_stops_on_drop() {
        let engine = build_engine(&WasmConfig {
            pool_instances: 2,
            ..WasmConfig::default()
        })
        .expect("engine");
        let ticker = Ticker::start(engine).expect("ticker");
        assert_eq!(ticker.running(), 0);
        // Idle from the start: it lingers LINGER, then parks; its 200 ms timeouts must not
        // start it ticking again.
        let idle = |ticker: &Ticker| {
            std::thread::sleep(LINGER + Duration::from_millis(500));
            let parked_at = ticker.ticks();
            std::thread::sleep(Duration::from_millis(500));
            assert_eq!(ticker.ticks(), parked_at, "ticked while idle");
        };
        idle(&ticker);
        let before = ticker.ticks();
        let guard = ticker.try_enter(1).expect("room for one");
        assert_eq!(ticker.running(), 1);
        assert!(ticker.try_enter(1).is_none());
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while ticker.ticks() <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "no tick while an instance ran"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(guard);
        assert_eq!(ticker.running(), 0);
        idle(&ticker);
        let started = std::time::Instant::now();
        drop(ticker);
        // The parked thread is woken, not waited for until its 200 ms park timeout (with
        // some room for a loaded machine).
        assert!(started.elapsed() < Duration::from_millis(150));
    }
}
