use std::path::Path;

use warren_runtime::{Backend, BackendError, SlotBackend};

use super::*;
use crate::store::RedbStore;

fn plane_at(dir: &Path, capacity: &str) -> ControlPlane {
    let store = RedbStore::open(dir.join("state.redb")).expect("store");
    let slot =
        SlotBackend::new(dir.join("slot"), capacity.parse().expect("capacity")).expect("slot");
    let agent = Agent::new("n1", [Arc::new(slot) as Arc<dyn Backend>]);
    ControlPlane::new(agent, Arc::new(store), Duration::from_secs(1))
}

/// Opens a store once the last handle of a dropped plane has let it go.
async fn open_when_free(path: &Path) -> RedbStore {
    for _ in 0..200 {
        match RedbStore::open(path) {
            Ok(s) => return s,
            Err(crate::store::StoreError::Locked { .. }) => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("open {}: {e}", path.display()),
        }
    }
    panic!("{} still locked after 2 s", path.display());
}

/// Drops a plane (its store joins its writer, freeing the file) and starts a new one.
async fn reopen(dir: &Path, plane: ControlPlane) -> ControlPlane {
    drop(plane);
    drop(open_when_free(&dir.join("state.redb")).await);
    let p = plane_at(dir, "");
    p.recover().await.expect("recover");
    p
}

fn spec(name: &str) -> SandboxSpec {
    let mut s = SandboxSpec {
        name: name.into(),
        ..Default::default()
    };
    s.annotations
        .insert("resources.limits.cpu".into(), "1".into());
    s.resources.limits.memory = Some("256Mi".into());
    s
}

#[tokio::test]
async fn create_get_list_update_delete() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let plane = plane_at(tmp.path(), "");
    let (rec, created) = plane.create(spec("a")).await.expect("create");
    assert!(created);
    assert_eq!(rec.status, Phase::Running);
    assert_eq!(rec.revision, 1);
    assert_eq!(rec.resources.cpu_limit, Some(1.0));
    assert_eq!(rec.resources.memory_limit, Some(256 << 20));
    let path = rec.backend_info["resources_path"].clone();
    assert!(Path::new(&path).exists());

    let mut b = spec("b");
    b.labels.insert("app".into(), "web".into());
    plane.create(b).await.expect("create b");
    let names =
        |v: Vec<Arc<SandboxRecord>>| v.iter().map(|r| r.spec.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(plane.list("", &[]).expect("list")), ["a", "b"]);
    assert_eq!(names(plane.list("app=web", &[]).expect("list")), ["b"]);
    assert_eq!(names(plane.list("!app", &[]).expect("list")), ["a"]);
    assert!(plane.list("", &[BackendKind::Vm]).expect("list").is_empty());

    let update = SandboxUpdate {
        resources: Some(ResourceRequirements {
            limits: warren_spec::ResourceList {
                memory: Some("1Gi".into()),
                ..Default::default()
            },
            ..Default::default()
        }),
        set_labels: [("tier".to_string(), "x".to_string())].into(),
        expected_revision: Some(1),
        ..Default::default()
    };
    let updated = plane.update("a", update).await.expect("update");
    assert_eq!(updated.revision, 2);
    assert_eq!(updated.resources.memory_limit, Some(1 << 30));
    let on_disk: ResourceInfo =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
    assert_eq!(
        on_disk.memory_limit,
        Some(1 << 30),
        "the backend saw the resize"
    );
    let stale = SandboxUpdate {
        expected_revision: Some(1),
        remove_labels: vec!["tier".into()],
        ..Default::default()
    };
    assert!(matches!(
        plane.update("a", stale).await,
        Err(ControlError::RevisionMismatch { actual: 2, .. })
    ));
    let noop = plane
        .update("a", SandboxUpdate::default())
        .await
        .expect("no-op update");
    assert_eq!(
        noop.revision, 2,
        "an update that changes nothing does not bump the revision"
    );

    // A delete that names an id deletes only that sandbox: a name taken again since is
    // left, and says so.
    let id = plane.get("a").expect("get").id.clone();
    let other = plane.delete_id("a", Some("another"), None).await;
    assert!(
        matches!(&other, Err(ControlError::IdMismatch { actual, .. }) if *actual == id),
        "{other:?}"
    );
    assert_eq!(plane.get("a").expect("still there").status, Phase::Running);
    let gone = plane.delete_id("a", Some(&id), None).await.expect("delete");
    assert_eq!(gone.status, Phase::Deleted);
    assert!(!Path::new(&path).exists());
    assert!(matches!(plane.get("a"), Err(ControlError::NotFound { .. })));
    assert!(matches!(
        plane.delete("a", None).await,
        Err(ControlError::NotFound { .. })
    ));
}

#[tokio::test]
async fn create_is_idempotent_by_name_and_refuses_a_different_spec() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let plane = plane_at(tmp.path(), "");
    let (first, _) = plane.create(spec("a")).await.expect("create");
    let (again, created) = plane.create(spec("a")).await.expect("retry");
    assert!(!created);
    assert_eq!(again.id, first.id);
    let mut other = spec("a");
    other.image = Some("busybox".into());
    assert!(matches!(
        plane.create(other).await,
        Err(ControlError::AlreadyExists { .. })
    ));
    assert_eq!(plane.list("", &[]).expect("list").len(), 1);
}

#[tokio::test]
async fn invalid_specs_and_full_nodes_leave_nothing_behind() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let plane = plane_at(tmp.path(), "cpu=1");
    let mut bad = spec("bad");
    bad.resources.limits.memory = Some("2Gx".into());
    let e = plane.create(bad).await.expect_err("bad quantity");
    assert!(
        e.to_string().contains("spec.resources.limits.memory"),
        "{e}"
    );

    plane.create(spec("fits")).await.expect("fits");
    let e = plane
        .create(spec("too-much"))
        .await
        .expect_err("no cpu left");
    assert!(
        matches!(
            e,
            ControlError::Agent(AgentError::Backend(BackendError::Capacity { .. }))
        ),
        "{e}"
    );
    assert!(matches!(
        plane.get("too-much"),
        Err(ControlError::NotFound { .. })
    ));
    let dirs = std::fs::read_dir(tmp.path().join("slot"))
        .expect("slot dir")
        .count();
    assert_eq!(dirs, 1, "only the sandbox that fits has files");

    let mut vm = spec("vm");
    vm.backend = BackendKind::Vm;
    let e = plane.create(vm).await.expect_err("no vm backend");
    assert!(
        matches!(e, ControlError::Agent(AgentError::Unavailable { .. })),
        "{e}"
    );
}

#[tokio::test]
async fn state_survives_a_restart_and_orphans_are_removed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let plane = plane_at(tmp.path(), "");
    let (kept, _) = plane.create(spec("kept")).await.expect("create");
    // An orphan: backend files with no record (a crash between the backend and the commit).
    let orphan = tmp.path().join("slot").join("0123orphan");
    std::fs::create_dir_all(&orphan).expect("orphan dir");
    std::fs::write(orphan.join("resources.json"), "{}").expect("orphan file");
    // A lost JSON file is re-written from the store.
    std::fs::remove_file(&kept.backend_info["resources_path"]).expect("remove json");

    let plane = reopen(tmp.path(), plane).await;
    let rec = plane.get("kept").expect("kept survives");
    assert_eq!(rec.id, kept.id);
    assert_eq!(rec.status, Phase::Running);
    assert!(
        Path::new(&rec.backend_info["resources_path"]).exists(),
        "json re-written"
    );
    assert!(!orphan.exists(), "orphan removed");
    assert_eq!(
        plane.summary().allocated.cpu_request,
        Some(1.0),
        "capacity re-accounted"
    );
}

#[tokio::test]
async fn watch_sees_every_change_in_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let plane = plane_at(tmp.path(), "");
    plane.create(spec("before")).await.expect("create");
    let (_, initial, mut rx) = plane.watch("").expect("watch");
    assert_eq!(initial.len(), 1);
    plane.create(spec("w")).await.expect("create");
    plane
        .update(
            "w",
            SandboxUpdate {
                set_labels: [("k".into(), "v".into())].into(),
                ..Default::default()
            },
        )
        .await
        .expect("update");
    plane.delete("w", None).await.expect("delete");
    let mut seen = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        seen.push((ev.kind, ev.record.status.name(), ev.sequence));
    }
    let kinds: Vec<_> = seen.iter().map(|(k, p, _)| (*k, *p)).collect();
    assert_eq!(
        kinds,
        [
            (EventKind::Added, "Running"),
            (EventKind::Modified, "Running"),
            (EventKind::Modified, "Stopping"),
            (EventKind::Deleted, "Deleted"),
        ]
    );
    assert!(
        seen.windows(2).all(|w| w[1].2 == w[0].2 + 1),
        "sequence numbers are consecutive: {seen:?}"
    );
}

#[tokio::test]
async fn stop_keeps_the_sandbox_stopped_until_it_is_deleted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let plane = plane_at(tmp.path(), "");
    plane.create(spec("s")).await.expect("create");
    let (_, _, mut rx) = plane.watch("").expect("watch");
    let stopped = plane.stop("s", None).await.expect("stop");
    assert_eq!(stopped.status, Phase::Stopped);
    assert_eq!(plane.get("s").expect("kept").status, Phase::Stopped);
    let mut seen = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        seen.push((ev.kind, ev.record.status.name()));
    }
    assert_eq!(
        seen,
        [
            (EventKind::Modified, "Stopping"),
            (EventKind::Modified, "Stopped"),
        ]
    );
    // Not running: returned as it is, nothing changes.
    let again = plane.stop("s", None).await.expect("stop again");
    assert_eq!(again.revision, stopped.revision);
    assert!(rx.try_recv().is_err(), "a second stop changed something");
    assert!(matches!(
        plane.stop("nope", None).await,
        Err(ControlError::NotFound { .. })
    ));
    // Stored: a restarted server has it Stopped.
    let plane = reopen(tmp.path(), plane).await;
    assert_eq!(plane.get("s").expect("kept").status, Phase::Stopped);
    plane.delete("s", None).await.expect("delete");
    assert!(plane.get("s").is_err());
}

#[tokio::test]
async fn pause_is_recorded_refuses_exec_and_ends_with_a_stop() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let plane = plane_at(tmp.path(), "");
    let (created, _) = plane.create(spec("s")).await.expect("create");
    let (_, _, mut rx) = plane.watch("").expect("watch");
    let paused = plane.pause("s", true).await.expect("pause");
    assert!(paused.paused);
    assert_eq!(paused.status, Phase::Running);
    assert_eq!(paused.revision, created.revision + 1);
    assert!(paused.to_pb().status.expect("status").paused);
    assert_eq!(rx.try_recv().expect("an event").kind, EventKind::Modified);
    // Again: nothing changes.
    let again = plane.pause("s", true).await.expect("pause again");
    assert_eq!(again.revision, paused.revision);
    assert!(rx.try_recv().is_err(), "a second pause changed something");
    let exec = warren_runtime::ExecRequest {
        argv: vec!["true".into()],
        ..Default::default()
    };
    let refused = plane.exec("s", exec).await.map(|_| ()).unwrap_err();
    assert!(matches!(refused, ControlError::Paused { .. }), "{refused}");
    assert!(refused.to_string().contains("unpause"), "{refused}");
    // Stored: a restarted server has it paused.
    let plane = reopen(tmp.path(), plane).await;
    assert!(plane.get("s").expect("kept").paused);
    let resumed = plane.pause("s", false).await.expect("unpause");
    assert!(!resumed.paused);
    plane.pause("s", true).await.expect("pause");
    // A stop ends the pause with the workload.
    let stopped = plane.stop("s", None).await.expect("stop");
    assert_eq!(stopped.status, Phase::Stopped);
    assert!(!stopped.paused);
    assert!(matches!(
        plane.pause("s", true).await,
        Err(ControlError::NotRunning { .. })
    ));
    assert!(matches!(
        plane.pause("nope", true).await,
        Err(ControlError::NotFound { .. })
    ));
    plane.delete("s", None).await.expect("delete");
}

#[tokio::test]
async fn expired_sandboxes_are_deleted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let plane = plane_at(tmp.path(), "");
    // An expiry already past is refused, at create and in an update.
    let mut past = spec("past");
    past.expire_time = Some(now_ms() / 1000 - 1);
    match plane.create(past).await {
        Err(ControlError::InvalidSpec(m)) => {
            assert!(
                m.contains("spec.expireTime") && m.contains("in the past"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    let mut old = spec("old");
    let at = now_ms() / 1000 + 1;
    old.expire_time = Some(at);
    plane.create(old).await.expect("create");
    let mut young = spec("young");
    young.expire_time = Some(now_ms() / 1000 + 3600);
    plane.create(young).await.expect("create");
    let back = SandboxUpdate {
        expire_time: Some(Some(now_ms() / 1000 - 1)),
        ..SandboxUpdate::default()
    };
    assert!(matches!(
        plane.update("young", back).await,
        Err(ControlError::InvalidSpec(_))
    ));
    while now_ms() / 1000 < at {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(plane.expire().await, 1);
    assert!(plane.get("old").is_err());
    assert!(plane.get("young").is_ok());
    // What a sweep found due is deleted only if it still is the sandbox it found, still due:
    // not one whose expiry moved meanwhile, nor one made again under the name.
    let young = plane.get("young").expect("young");
    assert!(matches!(
        plane.delete_as("young", Some(&young.id), None, true).await,
        Err(ControlError::NotFound { .. })
    ));
    assert!(matches!(
        plane.delete_as("young", Some("another"), None, true).await,
        Err(ControlError::IdMismatch { .. })
    ));
    assert!(plane.get("young").is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_operations_on_one_name_never_interleave() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let plane = plane_at(tmp.path(), "");
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let p = plane.clone();
        tasks.push(tokio::spawn(async move { p.create(spec("same")).await }));
    }
    let mut created = 0;
    for t in tasks {
        match t.await.expect("join") {
            Ok((_, true)) => created += 1,
            Ok((_, false)) | Err(ControlError::Busy { .. }) => {}
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert_eq!(created, 1, "exactly one create made the sandbox");
    assert_eq!(
        std::fs::read_dir(tmp.path().join("slot"))
            .expect("dir")
            .count(),
        1
    );
}

/// A backend whose workloads exit by themselves, at once: the exit event races the create
/// that started them, which is the case the deferral exists for.
#[derive(Debug)]
struct ExitingBackend {
    events: warren_runtime::EventSink,
    code: i32,
}

#[async_trait::async_trait]
impl Backend for ExitingBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Wasm
    }
    fn is_available(&self) -> Result<(), String> {
        Ok(())
    }
    async fn create(&self, _: &SandboxConfig) -> Result<warren_runtime::BackendInfo, BackendError> {
        Ok(Default::default())
    }
    async fn start(&self, id: &str) -> Result<(), BackendError> {
        let status = BackendStatus::Exited { code: self.code };
        let _ = self.events.send(BackendEvent {
            id: id.to_string(),
            status,
        });
        Ok(())
    }
    async fn stop(&self, _: &str, _: Duration) -> Result<BackendStatus, BackendError> {
        Ok(BackendStatus::Stopped)
    }
    async fn delete(&self, _: &str) -> Result<(), BackendError> {
        Ok(())
    }
    async fn status(&self, _: &str) -> Result<BackendStatus, BackendError> {
        Ok(BackendStatus::Exited { code: self.code })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_reported_during_create_is_applied_after_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (tx, rx) = mpsc::unbounded_channel();
    let store = RedbStore::open(tmp.path().join("state.redb")).expect("store");
    let agent = Agent::new(
        "n1",
        [Arc::new(ExitingBackend {
            events: tx,
            code: 3,
        }) as Arc<dyn Backend>],
    );
    let plane = ControlPlane::new(agent, Arc::new(store), Duration::from_secs(1));
    plane.spawn_event_loop(rx);
    for i in 0..20 {
        let mut s = spec(&format!("job{i}"));
        s.backend = BackendKind::Wasm;
        plane.create(s).await.expect("create");
    }
    for i in 0..20 {
        let name = format!("job{i}");
        let done = plane
            .wait(&name, Some(Duration::from_secs(5)))
            .await
            .expect("finishes");
        assert_eq!(done.status, Phase::Exited { code: 3 }, "{name}");
        assert_eq!(
            plane.get(&name).expect("get").status,
            Phase::Exited { code: 3 }
        );
    }
    // The end is durable: a restart still says Exited(3). Background tasks (the event loop,
    // deferred events) may hold the plane for a moment after this drop.
    drop(plane);
    let store = open_when_free(&tmp.path().join("state.redb")).await;
    let rows = store.scan(crate::record::PREFIX).expect("scan");
    assert_eq!(rows.len(), 20);
    for (_, v) in rows {
        let rec: SandboxRecord = serde_json::from_slice(&v).expect("record");
        assert_eq!(rec.status, Phase::Exited { code: 3 });
    }
}

#[tokio::test]
async fn wait_times_out_and_reports_missing_sandboxes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let plane = plane_at(tmp.path(), "");
    plane.create(spec("forever")).await.expect("create");
    let e = plane
        .wait("forever", Some(Duration::from_millis(50)))
        .await
        .expect_err("slot never ends");
    assert!(matches!(e, ControlError::WaitTimeout { .. }), "{e}");
    assert!(matches!(
        plane.wait("nope", None).await,
        Err(ControlError::NotFound { .. })
    ));
    assert!(matches!(
        plane.log_source("forever").await,
        Err(ControlError::NoLogs { .. })
    ));
}

/// Waiters are answered by their own sandbox's end, each once; those that gave up are pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_end_answers_its_own_waiters() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let plane = plane_at(tmp.path(), "");
    plane.create(spec("a")).await.expect("create");
    plane.create(spec("b")).await.expect("create");
    for _ in 0..50 {
        let e = plane.wait("a", Some(Duration::from_millis(1))).await;
        assert!(matches!(e, Err(ControlError::WaitTimeout { .. })));
    }
    let waiting = |name: &'static str| {
        let plane = plane.clone();
        tokio::spawn(async move { plane.wait(name, Some(Duration::from_secs(10))).await })
    };
    let (a1, a2, b) = (waiting("a"), waiting("a"), waiting("b"));
    // The three tasks register when they first run: polled, not slept on.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (on_a, on_b) = {
            let inner = plane.lock();
            let count = |n: &str| inner.waiters.get(n).map_or(0, Vec::len);
            (count("a"), count("b"))
        };
        if on_a == 2 && on_b == 1 {
            break;
        }
        // Until a's first new waiter registers, the 50 that timed out are still there.
        assert!(
            tokio::time::Instant::now() < deadline,
            "{on_a} waiters on a (the 50 that timed out should be pruned), {on_b} on b"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let gone = plane.delete("a", None).await.expect("delete");
    for w in [a1, a2] {
        let rec = w.await.expect("join").expect("answered");
        assert_eq!(rec.status, Phase::Deleted);
        assert_eq!(rec.revision, gone.revision);
    }
    assert!(!b.is_finished(), "b's waiter is not woken by a's end");
    plane.delete("b", None).await.expect("delete");
    assert_eq!(
        b.await.expect("join").expect("answered").status,
        Phase::Deleted
    );
    assert!(plane.lock().waiters.is_empty());
}

/// A create that starts while `warren image rm` runs waits to register its sandbox until
/// the removal is done, so the removal's check of the image's users cannot miss it.
#[tokio::test]
async fn a_create_registers_only_once_an_image_removal_is_done() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let plane = plane_at(tmp.path(), "");
    let mut with_image = spec("a");
    with_image.image = Some("busybox".into());
    let removing = plane.removing_image().await;
    let p = plane.clone();
    let create = tokio::spawn(async move { p.create(with_image).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        plane
            .sandboxes_of_image("sha256:b", |_| Some("sha256:b".into()))
            .is_empty(),
        "registered during the removal"
    );
    assert!(!create.is_finished());
    drop(removing);
    let (rec, created) = create.await.expect("join").expect("create");
    assert!(created);
    assert_eq!(rec.status, Phase::Running);
    assert_eq!(
        plane.sandboxes_of_image("sha256:b", |_| Some("sha256:b".into())),
        vec!["a".to_string()]
    );
}

/// The slot backend, counting pause and resume calls; its stop can be made to fail and its
/// adopt to report the workload ended.
#[derive(Debug)]
struct Probe {
    slot: SlotBackend,
    calls: std::sync::Mutex<Vec<&'static str>>,
    fail_stop: std::sync::atomic::AtomicBool,
    adopt_exited: bool,
    /// Held by a test: a pause waits for it.
    pause_gate: tokio::sync::Mutex<()>,
}

impl Probe {
    fn new(dir: &Path, adopt_exited: bool) -> Arc<Probe> {
        Arc::new(Probe {
            slot: SlotBackend::new(dir.join("slot"), "".parse().expect("capacity")).expect("slot"),
            calls: Default::default(),
            fail_stop: Default::default(),
            adopt_exited,
            pause_gate: Default::default(),
        })
    }

    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().expect("calls").clone()
    }
}

#[async_trait::async_trait]
impl Backend for Probe {
    fn kind(&self) -> BackendKind {
        self.slot.kind()
    }
    fn is_available(&self) -> Result<(), String> {
        self.slot.is_available()
    }
    async fn create(
        &self,
        config: &SandboxConfig,
    ) -> Result<warren_runtime::BackendInfo, BackendError> {
        self.slot.create(config).await
    }
    async fn start(&self, id: &str) -> Result<(), BackendError> {
        self.slot.start(id).await
    }
    async fn stop(&self, id: &str, grace: Duration) -> Result<BackendStatus, BackendError> {
        if self.fail_stop.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(BackendError::Other("the stop failed".into()));
        }
        self.slot.stop(id, grace).await
    }
    async fn delete(&self, id: &str) -> Result<(), BackendError> {
        self.slot.delete(id).await
    }
    async fn status(&self, id: &str) -> Result<BackendStatus, BackendError> {
        self.slot.status(id).await
    }
    async fn adopt(
        &self,
        config: &SandboxConfig,
    ) -> Result<(BackendStatus, warren_runtime::BackendInfo), BackendError> {
        let (status, info) = self.slot.adopt(config).await?;
        if self.adopt_exited {
            return Ok((BackendStatus::Exited { code: 3 }, info));
        }
        Ok((status, info))
    }
    async fn list(&self) -> Result<Vec<String>, BackendError> {
        self.slot.list().await
    }
    async fn pause(&self, id: &str) -> Result<(), BackendError> {
        self.calls.lock().expect("calls").push("pause");
        let _gate = self.pause_gate.lock().await;
        self.slot.pause(id).await
    }
    async fn resume(&self, id: &str) -> Result<(), BackendError> {
        self.calls.lock().expect("calls").push("resume");
        self.slot.resume(id).await
    }
}

async fn probe_plane(dir: &Path, probe: &Arc<Probe>) -> ControlPlane {
    let store = open_when_free(&dir.join("state.redb")).await;
    let agent = Agent::new("n1", [probe.clone() as Arc<dyn Backend>]);
    let plane = ControlPlane::new(agent, Arc::new(store), Duration::from_secs(1));
    plane.recover().await.expect("recover");
    plane
}

#[tokio::test]
async fn pause_and_unpause_reach_the_backend_whatever_the_record_says() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let probe = Probe::new(tmp.path(), false);
    let plane = probe_plane(tmp.path(), &probe).await;
    let (created, _) = plane.create(spec("s")).await.expect("create");
    let (_, _, mut rx) = plane.watch("").expect("watch");
    // Not paused by its record, maybe frozen all the same (a server killed between the
    // freeze and its record): the backend is asked, and the record stays as it is.
    let same = plane.pause("s", false).await.expect("unpause");
    assert_eq!(probe.calls(), ["resume"]);
    assert_eq!(same.revision, created.revision);
    assert!(
        rx.try_recv().is_err(),
        "an unpause of a running sandbox changed its record"
    );
    let paused = plane.pause("s", true).await.expect("pause");
    assert!(paused.paused);
    plane.pause("s", true).await.expect("pause again");
    assert_eq!(probe.calls(), ["resume", "pause", "pause"]);
    assert_eq!(plane.get("s").expect("s").revision, paused.revision);
    plane.delete("s", None).await.expect("delete");
}

#[tokio::test]
async fn a_failed_stop_ends_the_pause_only_where_the_backend_got_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let probe = Probe::new(tmp.path(), false);
    let plane = probe_plane(tmp.path(), &probe).await;
    plane.create(spec("s")).await.expect("create");
    let paused = plane.pause("s", true).await.expect("pause");
    // The backend got the stop (and resumed the workload first): Running, not paused, and
    // stored so.
    probe
        .fail_stop
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let err = plane.stop("s", None).await.unwrap_err();
    assert!(err.to_string().contains("the stop failed"), "{err}");
    let after = plane.get("s").expect("s");
    assert_eq!(after.status, Phase::Running);
    assert!(!after.paused);
    assert!(after.revision > paused.revision);
    drop(plane);
    let plane = probe_plane(tmp.path(), &probe).await;
    assert!(
        !plane.get("s").expect("s").paused,
        "the end of the pause was not stored"
    );

    // A sandbox on an agent that has not registered (after a restart): the stop does not
    // reach it, so its workload may still be frozen there and the record keeps the pause.
    let mut far = spec("far");
    let resources = far.validate().expect("valid");
    far.backend = BackendKind::Slot;
    let mut rec = SandboxRecord::creating(far, resources, "n2".into(), None);
    rec.status = Phase::Running;
    rec.paused = true;
    rec.revision = 2;
    plane
        .inner
        .store
        .write(crate::store::Write::Put {
            key: record::key("far"),
            value: serde_json::to_vec(&rec).expect("json"),
        })
        .await
        .expect("write");
    drop(plane);
    let plane = probe_plane(tmp.path(), &probe).await;
    let err = plane.stop("far", None).await.unwrap_err();
    assert!(err.to_string().contains("has not registered"), "{err}");
    let far = plane.get("far").expect("far");
    assert_eq!(far.status, Phase::Running);
    assert!(far.paused, "a stop that reached no agent ended the pause");
}

#[tokio::test]
async fn a_paused_sandbox_found_ended_at_a_restart_is_not_paused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let plane = probe_plane(tmp.path(), &Probe::new(tmp.path(), false)).await;
    plane.create(spec("s")).await.expect("create");
    plane.pause("s", true).await.expect("pause");
    drop(plane);
    let plane = probe_plane(tmp.path(), &Probe::new(tmp.path(), true)).await;
    let rec = plane.get("s").expect("s");
    assert_eq!(rec.status, Phase::Exited { code: 3 });
    assert!(!rec.paused);
    // Stored so.
    drop(plane);
    let plane = probe_plane(tmp.path(), &Probe::new(tmp.path(), false)).await;
    let rec = plane.get("s").expect("s");
    assert!(!rec.paused);
    assert_eq!(rec.status, Phase::Exited { code: 3 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_or_an_exec_waits_for_a_pause_under_way() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let probe = Probe::new(tmp.path(), false);
    let plane = probe_plane(tmp.path(), &probe).await;
    plane.create(spec("s")).await.expect("create");
    let gate = probe.pause_gate.lock().await;
    let pausing = tokio::spawn({
        let plane = plane.clone();
        async move { plane.pause("s", true).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while probe.calls().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pause never reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The backend is freezing it: a signal would thaw it midway, an exec join it.
    let signal = plane.signal("s", 15).await.unwrap_err();
    assert!(matches!(signal, ControlError::Busy { .. }), "{signal}");
    let exec = warren_runtime::ExecRequest {
        argv: vec!["true".into()],
        ..Default::default()
    };
    let exec = plane.exec("s", exec).await.map(|_| ()).unwrap_err();
    assert!(matches!(exec, ControlError::Busy { .. }), "{exec}");
    // Reading it is fine.
    assert!(plane.usage("s").await.is_ok());
    drop(gate);
    assert!(pausing.await.expect("join").expect("pause").paused);
    // Settled: a signal goes through (and, delivered, ends the pause).
    plane.signal("s", 15).await.expect("signal");
}
