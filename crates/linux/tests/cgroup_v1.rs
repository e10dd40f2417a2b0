//! Real cgroups on this host (run as root): limits read back from the kernel's files, and
//! enforced. This machine is a v1 (hybrid) host; on a pure v2 host the v1-only test prints
//! SKIP and the v2 ones run instead. Every test works under its own parent cgroup
//! `warren-test-<pid>-<n>`, removed by a drop guard even when the test fails.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use warren_linux::cgroup::{Cgroup, CgroupError, CgroupLayout, CgroupLimits};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Owns what a test creates: processes are killed and reaped, cgroups killed and removed,
/// and the parent directories removed when it drops, panicking or not.
struct Fixture {
    layout: CgroupLayout,
    parent: String,
    cgroups: Vec<Cgroup>,
    children: Vec<Child>,
}

impl Fixture {
    fn new(layout: CgroupLayout) -> Fixture {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Fixture {
            layout,
            parent: format!("warren-test-{}-{n}", std::process::id()),
            cgroups: Vec::new(),
            children: Vec::new(),
        }
    }

    fn create(&mut self, name: &str, limits: &CgroupLimits) -> Cgroup {
        // Registered before creating, so a half-made cgroup is cleaned up too.
        self.cgroups
            .push(Cgroup::open(&self.layout, &self.parent, name));
        Cgroup::create(&self.layout, &self.parent, name, limits)
            .unwrap_or_else(|err| panic!("create cgroup {name}: {err:?}"))
    }

    /// Runs `script` in `sh`, which first moves itself into `cgroup` (so limits apply from its
    /// first fork). Output goes to /dev/null: orphaned grandchildren must not hold a pipe.
    fn spawn_in(&mut self, cgroup: &Cgroup, script: &str) -> usize {
        let files: Vec<String> = cgroup
            .procs_files()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let script = format!(
            "for f in {}; do echo $$ > $f || exit 97; done; {script}",
            files.join(" ")
        );
        self.spawn(Command::new("/bin/sh").args(["-c", &script]))
    }

    fn spawn(&mut self, command: &mut Command) -> usize {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        self.children.push(child);
        self.children.len() - 1
    }

    fn child(&mut self, index: usize) -> &mut Child {
        &mut self.children[index]
    }

    /// The parent cgroup's directories.
    fn parent_dirs(&self) -> Vec<PathBuf> {
        let mut mounts: Vec<&PathBuf> = match &self.layout {
            CgroupLayout::V1 { mounts } => mounts.values().collect(),
            CgroupLayout::V2 { root } => vec![root],
        };
        mounts.sort();
        mounts.dedup();
        mounts.iter().map(|m| m.join(&self.parent)).collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for cgroup in &self.cgroups {
            if let Err(err) = cgroup.kill_all().and_then(|()| cgroup.remove()) {
                eprintln!("cleanup of {:?}: {err}", cgroup.paths());
            }
        }
        for dir in self.parent_dirs() {
            if let Err(err) = fs::remove_dir(&dir)
                && err.kind() != std::io::ErrorKind::NotFound
            {
                eprintln!("cleanup of {}: {err}", dir.display());
            }
        }
    }
}

fn layout() -> CgroupLayout {
    CgroupLayout::detect().expect("this host has cgroups")
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("read {}: {err}", path.display()))
        .trim()
        .to_owned()
}

fn limits() -> CgroupLimits {
    CgroupLimits {
        memory_bytes: Some(50 << 20),
        pids: Some(20),
        cpu_limit_millis: Some(200),
        cpu_request_millis: Some(500),
    }
}

#[test]
fn v1_limits_read_back_from_the_kernel() {
    let layout = layout();
    let CgroupLayout::V1 { mounts } = &layout else {
        eprintln!("SKIP: no cgroup v1 memory hierarchy");
        return;
    };
    if !mounts.contains_key("memory") {
        eprintln!("SKIP: no cgroup v1 memory hierarchy");
        return;
    }
    let mut fixture = Fixture::new(layout.clone());
    let started = Instant::now();
    let cgroup = fixture.create("limits", &limits());
    let created = started.elapsed();
    let dir = |controller: &str| mounts[controller].join(&fixture.parent).join("limits");

    let memory = dir("memory");
    assert_eq!(read(memory.join("memory.limit_in_bytes")), "52428800");
    if memory.join("memory.memsw.limit_in_bytes").exists() {
        assert_eq!(read(memory.join("memory.memsw.limit_in_bytes")), "52428800");
    }
    assert_eq!(read(dir("pids").join("pids.max")), "20");
    assert_eq!(read(dir("cpu").join("cpu.cfs_period_us")), "100000");
    assert_eq!(read(dir("cpu").join("cpu.cfs_quota_us")), "20000");
    assert_eq!(read(dir("cpu").join("cpu.shares")), "512");

    // Raising needs memsw first, lowering needs the memory limit first.
    for bytes in [200u64 << 20, 30 << 20] {
        cgroup
            .update(&CgroupLimits {
                memory_bytes: Some(bytes),
                ..CgroupLimits::default()
            })
            .unwrap();
        assert_eq!(
            read(memory.join("memory.limit_in_bytes")),
            bytes.to_string()
        );
        if memory.join("memory.memsw.limit_in_bytes").exists() {
            assert_eq!(
                read(memory.join("memory.memsw.limit_in_bytes")),
                bytes.to_string()
            );
        }
    }

    let started = Instant::now();
    cgroup.remove().unwrap();
    eprintln!(
        "v1 cgroup: create + limits {created:?}, remove {:?}",
        started.elapsed()
    );
    assert!(!cgroup.exists());
}

#[test]
fn v2_limits_read_back_from_the_kernel() {
    let layout = layout();
    let CgroupLayout::V2 { root } = &layout else {
        eprintln!("SKIP: host is not in cgroup v2 unified mode (see the v1 tests)");
        return;
    };
    let root = root.clone();
    let mut fixture = Fixture::new(layout);
    let cgroup = fixture.create("limits", &limits());
    let dir = root.join(&fixture.parent).join("limits");
    assert_eq!(read(dir.join("memory.max")), "52428800");
    if dir.join("memory.swap.max").exists() {
        assert_eq!(read(dir.join("memory.swap.max")), "0");
    }
    assert_eq!(read(dir.join("pids.max")), "20");
    assert_eq!(read(dir.join("cpu.max")), "20000 100000");
    assert_eq!(read(dir.join("cpu.weight")), "20");
    cgroup.remove().unwrap();
}

#[test]
fn add_pid_stats_kill_all_remove() {
    let mut fixture = Fixture::new(layout());
    let cgroup = fixture.create("procs", &limits());
    let sleeper = fixture.spawn(Command::new("sleep").arg("30"));
    let pid = i32::try_from(fixture.child(sleeper).id()).unwrap();
    cgroup.add_pid(pid).unwrap();
    assert_eq!(cgroup.pids().unwrap(), [pid]);
    let stats = cgroup.stats().unwrap();
    assert!(stats.memory_bytes.is_some(), "{stats:?}");
    assert_eq!(stats.pids, Some(1), "{stats:?}");
    assert!(!cgroup.oom_killed().unwrap());

    let started = Instant::now();
    cgroup.kill_all().unwrap();
    eprintln!("kill_all of one process: {:?}", started.elapsed());
    let status = fixture.child(sleeper).wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");
    assert!(cgroup.pids().unwrap().is_empty());
    cgroup.remove().unwrap();
    assert!(!cgroup.exists());
    // Removing a missing cgroup is fine.
    cgroup.remove().unwrap();
}

#[test]
fn pids_limit_caps_a_fork_loop() {
    let mut fixture = Fixture::new(layout());
    let cgroup = fixture.create(
        "forks",
        &CgroupLimits {
            pids: Some(20),
            ..CgroupLimits::default()
        },
    );
    // The shell gives up at the first failed fork (dash exits), leaving its sleeps behind.
    let shell = fixture.spawn_in(
        &cgroup,
        "i=0; while [ $i -lt 50 ]; do sleep 30 & i=$((i+1)); done; wait",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut count = 0;
    while Instant::now() < deadline {
        count = cgroup.pids().unwrap().len();
        // Done once the shell has exited or the cgroup is at its limit.
        if fixture.child(shell).try_wait().unwrap().is_some() || count >= 20 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    count = count.max(cgroup.pids().unwrap().len());
    assert!(count <= 20, "{count} processes despite pids.max = 20");
    assert!(count >= 10, "only {count} processes: did the loop run?");
    let rejected = cgroup
        .paths()
        .iter()
        .map(|dir| dir.join("pids.events"))
        .find(|path| path.exists())
        .map(read);
    if let Some(events) = rejected {
        assert_ne!(events, "max 0", "no fork was rejected");
    }
    eprintln!("fork loop capped at {count} processes");
    cgroup.kill_all().unwrap();
    assert!(cgroup.pids().unwrap().is_empty());
    cgroup.remove().unwrap();
}

#[test]
fn memory_limit_oom_kills() {
    let mut fixture = Fixture::new(layout());
    let cgroup = fixture.create(
        "oom",
        &CgroupLimits {
            memory_bytes: Some(50 << 20),
            ..CgroupLimits::default()
        },
    );
    // dd allocates and fills a 200M buffer.
    let dd = fixture.spawn_in(&cgroup, "exec dd if=/dev/zero of=/dev/null bs=200M count=1");
    let status = fixture.child(dd).wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");
    assert!(cgroup.oom_killed().unwrap());
    cgroup.remove().unwrap();
}

/// This host's `cgroup2` mount at /sys/fs/cgroup/unified has no memory, pids or cpu
/// controller, but it exercises the real v2 paths: mkdir, cgroup.procs, cgroup.kill, rmdir,
/// and the error for a controller that is not there.
#[test]
fn v2_mount_without_controllers() {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let unified = mountinfo.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let dash = fields.iter().position(|f| *f == "-")?;
        (fields.get(dash + 1) == Some(&"cgroup2")).then(|| PathBuf::from(fields[4]))
    });
    let Some(root) = unified else {
        eprintln!("SKIP: no cgroup2 mount");
        return;
    };
    let layout = CgroupLayout::V2 { root: root.clone() };
    let available = read(root.join("cgroup.controllers"));
    if available.split_whitespace().any(|c| c == "memory") {
        eprintln!(
            "SKIP: {} has a memory controller; covered above",
            root.display()
        );
        return;
    }
    let mut fixture = Fixture::new(layout.clone());
    let err = Cgroup::create(
        &layout,
        &fixture.parent,
        "nomem",
        &CgroupLimits {
            memory_bytes: Some(50 << 20),
            ..CgroupLimits::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            CgroupError::ControllerUnavailable {
                controller: "memory",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        !root.join(&fixture.parent).exists(),
        "create did not roll back"
    );

    let cgroup = fixture.create("procs", &CgroupLimits::default());
    let sleeper = fixture.spawn(Command::new("sleep").arg("30"));
    let pid = i32::try_from(fixture.child(sleeper).id()).unwrap();
    cgroup.add_pid(pid).unwrap();
    assert_eq!(cgroup.pids().unwrap(), [pid]);
    cgroup.kill_all().unwrap();
    assert_eq!(fixture.child(sleeper).wait().unwrap().signal(), Some(9));
    cgroup.remove().unwrap();
    assert!(!cgroup.exists());
}
