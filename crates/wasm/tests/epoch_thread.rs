//! Dropping the backend ends its instances and its epoch thread. A test binary of its own,
//! so no other test's backend is counted.

use std::time::{Duration, Instant};

use warren_runtime::{Backend, SandboxConfig};
use warren_spec::{ResourceInfo, SandboxSpec};
use warren_wasm::{WasmBackend, WasmConfig};

fn epoch_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == "wasm-epoch")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_backend_stops_instances_and_the_epoch_thread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let config = WasmConfig {
        pool_instances: 4,
        ..WasmConfig::default()
    };
    let backend = WasmBackend::new(dir.path().to_path_buf(), config, tx).expect("backend");
    // The new thread names itself once it runs, so give it a moment to appear.
    let deadline = Instant::now() + Duration::from_secs(2);
    while epoch_threads() != 1 {
        assert!(
            Instant::now() < deadline,
            "expected one epoch thread, found {}",
            epoch_threads()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sandbox = SandboxConfig {
        id: "loop".into(),
        spec: SandboxSpec {
            name: "loop".into(),
            image: Some(format!(
                "{}/tests/modules/loop.wat",
                env!("CARGO_MANIFEST_DIR")
            )),
            ..SandboxSpec::default()
        },
        resources: ResourceInfo::default(),
        stdin: None,
        policy: None,
    };
    backend.create(&sandbox).await.expect("create");
    backend.start("loop").await.expect("start");
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(backend);
    let deadline = Instant::now() + Duration::from_secs(2);
    while epoch_threads() > 0 {
        assert!(
            Instant::now() < deadline,
            "the epoch thread is still running"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
