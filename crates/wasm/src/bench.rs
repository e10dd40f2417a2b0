//! Instantiation micro-benchmark: what a sandbox costs between "module loaded" and "guest
//! done", without the API, the log or the status bookkeeping around it.

use std::time::{Duration, Instant};

use warren_runtime::BackendStatus;

use crate::run::{self, Job, P2, Program};

/// Samples from [`crate::WasmBackend::bench_instantiate`]. Each sample starts before the
/// store (and its WASI context) is built and ends when instantiation, or the run, returns;
/// tearing the store down afterwards (which returns its pool slot) is not timed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstantiateBench {
    /// New store and instantiation, no call into the guest.
    pub instantiate: Vec<Duration>,
    /// New store, instantiation, and `_start` (or `wasi:cli/run`) run to completion.
    pub instantiate_and_run: Vec<Duration>,
}

/// Takes `n` samples of each kind; the first error (or a run not exiting 0) ends it.
pub(crate) async fn instantiate(job: &Job, n: usize) -> Result<InstantiateBench, String> {
    let mut bench = InstantiateBench {
        instantiate: Vec::with_capacity(n),
        instantiate_and_run: Vec::with_capacity(n),
    };
    for _ in 0..n {
        bench.instantiate.push(sample(job, false).await?);
    }
    for _ in 0..n {
        bench.instantiate_and_run.push(sample(job, true).await?);
    }
    Ok(bench)
}

async fn sample(job: &Job, call: bool) -> Result<Duration, String> {
    let started = Instant::now();
    let (elapsed, result) = match &job.program {
        Program::Module(pre) => {
            let mut store = run::new_store(job, |wasi| wasi.build_p1())?;
            let result = if call {
                run::call_start(pre, &mut store).await
            } else {
                pre.instantiate_async(&mut store).await.map(drop)
            };
            (started.elapsed(), result)
        }
        Program::Component(pre) => {
            let mut store = run::new_store(job, P2::new)?;
            let result = if call {
                run::call_run(pre, &mut store).await
            } else {
                pre.instantiate_async(&mut store).await.map(drop)
            };
            (started.elapsed(), result)
        }
    };
    // `proc_exit(0)` is an error to wasmtime but a success here.
    match run::classify(result, false) {
        BackendStatus::Exited { code: 0 } => Ok(elapsed),
        status => Err(format!("the guest did not exit 0: {status:?}")),
    }
}
