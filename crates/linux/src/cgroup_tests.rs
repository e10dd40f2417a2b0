use std::fs;
use std::path::Path;

use tempfile::TempDir;

use super::*;

/// This machine: v1 controllers, systemd's name=systemd hierarchy and a cgroup2 "unified"
/// mount with no controllers that matter.
const HYBRID: &str = "\
23 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

/// A systemd host in unified mode (Debian 12, Fedora).
const PURE_V2: &str = "\
22 28 0:20 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
27 22 0:24 / /sys/fs/pstore rw,nosuid,nodev,noexec,relatime shared:5 - pstore pstore rw
28 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
";

/// Ubuntu 18.04-style systemd hybrid: cpu and cpuacct co-mounted (with cpu and cpuacct
/// symlinks that do not appear in mountinfo), net_cls,net_prio likewise.
const CO_MOUNTED: &str = "\
25 18 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
30 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,cpu,cpuacct
31 25 0:28 / /sys/fs/cgroup/net_cls,net_prio rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,net_cls,net_prio
32 25 0:29 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,memory
33 25 0:30 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup rw,pids
34 25 0:31 / /sys/fs/cgroup/freezer rw,nosuid,nodev,noexec,relatime shared:18 - cgroup cgroup rw,freezer
";

fn v1_mounts(pairs: &[(&str, &str)]) -> BTreeMap<String, PathBuf> {
    pairs
        .iter()
        .map(|(c, p)| ((*c).to_owned(), PathBuf::from(p)))
        .collect()
}

#[test]
fn mountinfo_hybrid_host_uses_v1() {
    let layout = CgroupLayout::from_mountinfo(HYBRID).unwrap();
    assert_eq!(layout.version(), 1);
    assert_eq!(
        layout,
        CgroupLayout::V1 {
            mounts: v1_mounts(&[
                ("cpu", "/sys/fs/cgroup/cpu"),
                ("cpuacct", "/sys/fs/cgroup/cpuacct"),
                ("freezer", "/sys/fs/cgroup/freezer"),
                ("memory", "/sys/fs/cgroup/memory"),
                ("pids", "/sys/fs/cgroup/pids"),
            ])
        }
    );
}

#[test]
fn mountinfo_pure_v2() {
    let layout = CgroupLayout::from_mountinfo(PURE_V2).unwrap();
    assert_eq!(layout.version(), 2);
    assert_eq!(
        layout,
        CgroupLayout::V2 {
            root: "/sys/fs/cgroup".into()
        }
    );
}

#[test]
fn mountinfo_co_mounted_cpu_cpuacct_is_one_hierarchy() {
    let layout = CgroupLayout::from_mountinfo(CO_MOUNTED).unwrap();
    let CgroupLayout::V1 { mounts } = &layout else {
        panic!("{layout:?}");
    };
    assert_eq!(mounts["cpu"], Path::new("/sys/fs/cgroup/cpu,cpuacct"));
    assert_eq!(mounts["cpuacct"], Path::new("/sys/fs/cgroup/cpu,cpuacct"));
    let cgroup = Cgroup::open(&layout, "warren", "x");
    assert_eq!(
        cgroup.procs_files(),
        [
            "/sys/fs/cgroup/cpu,cpuacct/warren/x/cgroup.procs",
            "/sys/fs/cgroup/freezer/warren/x/cgroup.procs",
            "/sys/fs/cgroup/memory/warren/x/cgroup.procs",
            "/sys/fs/cgroup/pids/warren/x/cgroup.procs",
        ]
        .map(PathBuf::from)
    );
}

#[test]
fn mountinfo_edge_cases() {
    // No cgroups at all.
    let none = "28 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n";
    assert!(matches!(
        CgroupLayout::from_mountinfo(none),
        Err(CgroupError::NoHierarchy)
    ));
    // Only a unified mount elsewhere: use it.
    let unified_only = "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
    assert_eq!(
        CgroupLayout::from_mountinfo(unified_only).unwrap(),
        CgroupLayout::V2 {
            root: "/sys/fs/cgroup/unified".into()
        }
    );
    // Escaped mount point, several optional fields, garbage lines.
    let escaped = "garbage\n\n35 31 0:32 / /mnt/my\\040cgroups/mem rw shared:1 master:2 - cgroup cgroup rw,memory\n";
    let CgroupLayout::V1 { mounts } = CgroupLayout::from_mountinfo(escaped).unwrap() else {
        panic!("expected v1");
    };
    assert_eq!(mounts["memory"], Path::new("/mnt/my cgroups/mem"));
}

#[test]
fn names_are_validated() {
    let layout = CgroupLayout::V2 { root: "/x".into() };
    for (parent, name) in [
        ("warren", ""),
        ("warren", ".."),
        ("warren", "."),
        ("warren", "a/b"),
        ("warren", "a\nb"),
        ("../etc", "x"),
        ("warren//pods", "x"),
        ("/warren", "x"),
        ("warren/", "x"),
    ] {
        let err = Cgroup::try_open(&layout, parent, name).unwrap_err();
        assert!(
            matches!(err, CgroupError::InvalidName { .. }),
            "{parent:?} {name:?}: {err}"
        );
        // `open` cannot fail, but its handle refuses to do anything.
        let handle = Cgroup::open(&layout, parent, name);
        assert!(handle.procs_files().is_empty());
        assert!(!handle.exists());
        assert!(matches!(
            handle.kill_all(),
            Err(CgroupError::InvalidName { .. })
        ));
        assert!(matches!(
            handle.remove(),
            Err(CgroupError::InvalidName { .. })
        ));
    }
    let err = Cgroup::try_open(&layout, "warren", "../x").unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"cgroup name "../x" is invalid: contains '/'"#
    );
    let nested = Cgroup::try_open(&layout, "warren/pods", "x").unwrap();
    assert_eq!(nested.paths(), [PathBuf::from("/x/warren/pods/x")]);
    let top = Cgroup::try_open(&layout, "", "x").unwrap();
    assert_eq!(top.paths(), [PathBuf::from("/x/x")]);
}

#[test]
fn cpu_conversions() {
    assert_eq!(cpu_quota_us(200).unwrap(), 20_000);
    assert_eq!(cpu_quota_us(1500).unwrap(), 150_000);
    assert_eq!(cpu_quota_us(1).unwrap(), MIN_CPU_QUOTA_US);
    assert!(cpu_quota_us(0).is_err());
    assert_eq!(cpu_shares(1000), 1024);
    assert_eq!(cpu_shares(500), 512);
    assert_eq!(cpu_shares(0), 2);
    assert_eq!(cpu_shares(u64::MAX), 262_144);
    assert_eq!(cpu_weight(2), 1);
    assert_eq!(cpu_weight(1024), 39);
    assert_eq!(cpu_weight(262_144), 10_000);
}

/// Creates `path` with `content`, and its directories.
fn put(path: &Path, content: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
}

fn read(path: impl AsRef<Path>) -> String {
    fs::read_to_string(path).unwrap()
}

/// A fake v1 host like this one, with the control files the kernel creates in `warren/x`.
fn fake_v1() -> (TempDir, CgroupLayout) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mounts = v1_mounts(&[
        ("cpu", "cpu,cpuacct"),
        ("cpuacct", "cpu,cpuacct"),
        ("freezer", "freezer"),
        ("memory", "memory"),
        ("pids", "pids"),
    ])
    .into_iter()
    .map(|(c, p)| (c, root.join(p)))
    .collect();
    let x = |hierarchy: &str, file: &str| root.join(hierarchy).join("warren/x").join(file);
    for (hierarchy, files) in [
        (
            "memory",
            &[
                ("memory.limit_in_bytes", "9223372036854771712\n"),
                ("memory.memsw.limit_in_bytes", "9223372036854771712\n"),
                ("memory.usage_in_bytes", "1048576\n"),
                ("memory.max_usage_in_bytes", "2097152\n"),
                (
                    "memory.oom_control",
                    "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
                ),
            ][..],
        ),
        (
            "pids",
            &[("pids.max", "max\n"), ("pids.current", "3\n")][..],
        ),
        (
            "cpu,cpuacct",
            &[
                ("cpu.cfs_period_us", "100000\n"),
                ("cpu.cfs_quota_us", "-1\n"),
                ("cpu.shares", "1024\n"),
                ("cpuacct.usage", "123456789\n"),
            ][..],
        ),
        ("freezer", &[("freezer.state", "THAWED\n")][..]),
    ] {
        put(&x(hierarchy, "cgroup.procs"), "");
        for (file, content) in files {
            put(&x(hierarchy, file), content);
        }
    }
    (tmp, CgroupLayout::V1 { mounts })
}

fn all_limits() -> CgroupLimits {
    CgroupLimits {
        memory_bytes: Some(50 << 20),
        pids: Some(20),
        cpu_limit_millis: Some(200),
        cpu_request_millis: Some(500),
    }
}

#[test]
fn v1_create_writes_limits() {
    let (tmp, layout) = fake_v1();
    let cgroup = Cgroup::create(&layout, "warren", "x", &all_limits()).unwrap();
    assert_eq!(cgroup.v2_dir(), None, "v1 has no directory to clone into");
    let dir = |h: &str| tmp.path().join(h).join("warren/x");
    assert_eq!(
        read(dir("memory").join("memory.limit_in_bytes")),
        "52428800"
    );
    assert_eq!(
        read(dir("memory").join("memory.memsw.limit_in_bytes")),
        "52428800"
    );
    assert_eq!(read(dir("pids").join("pids.max")), "20");
    assert_eq!(read(dir("cpu,cpuacct").join("cpu.cfs_period_us")), "100000");
    assert_eq!(read(dir("cpu,cpuacct").join("cpu.cfs_quota_us")), "20000");
    assert_eq!(read(dir("cpu,cpuacct").join("cpu.shares")), "512");
    assert_eq!(cgroup.version(), 1);
    assert!(cgroup.exists());
    assert_eq!(cgroup.paths().len(), 4, "{:?}", cgroup.paths());

    cgroup.add_pid(4242).unwrap();
    for path in cgroup.procs_files() {
        assert_eq!(read(path), "4242");
    }
    assert_eq!(cgroup.pids().unwrap(), [4242]);

    cgroup
        .update(&CgroupLimits {
            pids: Some(100),
            ..CgroupLimits::default()
        })
        .unwrap();
    assert_eq!(read(dir("pids").join("pids.max")), "100");
    // Unset fields are left alone.
    assert_eq!(
        read(dir("memory").join("memory.limit_in_bytes")),
        "52428800"
    );
}

#[test]
fn v1_unset_limits_are_not_written() {
    let (tmp, layout) = fake_v1();
    Cgroup::create(&layout, "warren", "x", &CgroupLimits::default()).unwrap();
    let memory = tmp.path().join("memory/warren/x");
    assert_eq!(
        read(memory.join("memory.limit_in_bytes")),
        "9223372036854771712\n"
    );
    assert_eq!(read(tmp.path().join("pids/warren/x/pids.max")), "max\n");
}

#[test]
fn v1_stats_and_oom() {
    let (tmp, layout) = fake_v1();
    let cgroup = Cgroup::open(&layout, "warren", "x");
    assert_eq!(
        cgroup.stats().unwrap(),
        CgroupStats {
            memory_bytes: Some(1 << 20),
            memory_peak_bytes: Some(2 << 20),
            cpu_usage_ns: Some(123_456_789),
            pids: Some(3),
        }
    );
    assert!(!cgroup.oom_killed().unwrap());
    let oom_control = tmp.path().join("memory/warren/x/memory.oom_control");
    fs::write(
        &oom_control,
        "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
    )
    .unwrap();
    assert!(cgroup.oom_killed().unwrap());
    fs::write(&oom_control, "oom_kill_disable 0\noom_kill many\n").unwrap();
    let err = cgroup.oom_killed().unwrap_err();
    assert!(err.to_string().contains("oom_kill many"), "{err}");
}

#[test]
fn v1_missing_controller_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = CgroupLayout::V1 {
        mounts: v1_mounts(&[("pids", tmp.path().join("pids").to_str().unwrap())]),
    };
    fs::create_dir(tmp.path().join("pids")).unwrap();
    let limits = CgroupLimits {
        memory_bytes: Some(1 << 20),
        ..CgroupLimits::default()
    };
    let err = Cgroup::create(&layout, "warren", "x", &limits).unwrap_err();
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
    // Rolled back: neither warren/x nor warren was left behind.
    assert!(!tmp.path().join("pids/warren").exists());
    // Without a memory hierarchy there is no OOM to report and no memory usage.
    let cgroup = Cgroup::open(&layout, "warren", "x");
    assert!(!cgroup.oom_killed().unwrap());
}

#[test]
fn failed_create_removes_what_it_created() {
    let (tmp, layout) = fake_v1();
    // The kernel would refuse the value; the fake refuses because the file is a directory.
    let pids_max = tmp.path().join("pids/warren/x/pids.max");
    fs::remove_file(&pids_max).unwrap();
    fs::create_dir(&pids_max).unwrap();
    let err = Cgroup::create(&layout, "warren", "x", &all_limits()).unwrap_err();
    let message = err.to_string();
    assert!(
        message.starts_with(r#"write "20" to "#) && message.ends_with("pids/warren/x/pids.max"),
        "{message}"
    );
    assert!(std::error::Error::source(&err).is_some());
    // Pre-existing directories stay; a new sibling cgroup is rolled back entirely.
    assert!(tmp.path().join("pids/warren/x").exists());
    let err = Cgroup::create(&layout, "other/deep", "y", &all_limits()).unwrap_err();
    assert!(
        matches!(err, CgroupError::ControllerUnavailable { .. }),
        "{err}"
    );
    for hierarchy in ["memory", "pids", "cpu,cpuacct", "freezer"] {
        assert!(
            !tmp.path().join(hierarchy).join("other").exists(),
            "{hierarchy}"
        );
    }
}

#[test]
fn kill_all_and_remove_on_an_empty_cgroup() {
    let (tmp, layout) = fake_v1();
    let cgroup = Cgroup::open(&layout, "warren", "x");
    cgroup.kill_all().unwrap();
    // Real cgroupfs lets rmdir ignore control files; the fake needs them gone first.
    for dir in cgroup.paths() {
        for entry in fs::read_dir(&dir).unwrap() {
            fs::remove_file(entry.unwrap().path()).unwrap();
        }
    }
    // A child cgroup made by the workload goes too.
    fs::create_dir_all(tmp.path().join("memory/warren/x/inner/deeper")).unwrap();
    cgroup.remove().unwrap();
    assert!(!cgroup.exists());
    // Removing again, and killing in a missing cgroup, are fine.
    cgroup.remove().unwrap();
    cgroup.kill_all().unwrap();
    assert!(tmp.path().join("memory/warren").exists());
}

/// A fake v2 host whose root offers `root_controllers`, with `warren` and `warren/x`
/// pre-created as the kernel would have them after enabling memory, pids and cpu.
fn fake_v2(root_controllers: &str) -> (TempDir, CgroupLayout) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    put(&root.join("cgroup.controllers"), root_controllers);
    put(&root.join("cgroup.subtree_control"), "");
    put(&root.join("warren/cgroup.controllers"), "cpu memory pids\n");
    put(&root.join("warren/cgroup.subtree_control"), "memory\n");
    for (file, content) in [
        ("cgroup.procs", ""),
        ("cgroup.controllers", ""),
        ("cgroup.subtree_control", ""),
        ("cgroup.freeze", "0\n"),
        ("memory.max", "max\n"),
        ("memory.swap.max", "max\n"),
        ("memory.current", "4096\n"),
        (
            "memory.events",
            "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
        ),
        ("pids.max", "max\n"),
        ("pids.current", "1\n"),
        ("cpu.max", "max 100000\n"),
        ("cpu.weight", "100\n"),
        (
            "cpu.stat",
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\n",
        ),
    ] {
        put(&root.join("warren/x").join(file), content);
    }
    let layout = CgroupLayout::V2 {
        root: root.to_owned(),
    };
    (tmp, layout)
}

#[test]
fn v2_create_enables_controllers_and_writes_limits() {
    let (tmp, layout) = fake_v2("cpuset cpu io memory hugetlb pids rdma misc\n");
    let cgroup = Cgroup::create(&layout, "warren", "x", &all_limits()).unwrap();
    assert_eq!(cgroup.v2_dir(), Some(tmp.path().join("warren/x").as_path()));
    let root = tmp.path();
    assert_eq!(
        read(root.join("cgroup.subtree_control")),
        "+memory +pids +cpu"
    );
    // memory was already enabled in warren: only the others are added.
    assert_eq!(
        read(root.join("warren/cgroup.subtree_control")),
        "+pids +cpu"
    );
    let x = root.join("warren/x");
    assert_eq!(read(x.join("memory.max")), "52428800");
    assert_eq!(read(x.join("memory.swap.max")), "0");
    assert_eq!(read(x.join("pids.max")), "20");
    assert_eq!(read(x.join("cpu.max")), "20000 100000");
    assert_eq!(read(x.join("cpu.weight")), "20");
    assert_eq!(cgroup.version(), 2);
    assert_eq!(cgroup.procs_files(), [x.join("cgroup.procs")]);

    assert_eq!(
        cgroup.stats().unwrap(),
        CgroupStats {
            memory_bytes: Some(4096),
            memory_peak_bytes: None,
            cpu_usage_ns: Some(1_500_000),
            pids: Some(1),
        }
    );
    assert!(!cgroup.oom_killed().unwrap());
    fs::write(
        x.join("memory.events"),
        "low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\noom_group_kill 0\n",
    )
    .unwrap();
    assert!(cgroup.oom_killed().unwrap());
}

#[test]
fn v2_unavailable_controllers_are_skipped_then_reported() {
    let (tmp, layout) = fake_v2("cpu memory hugetlb\n");
    fs::remove_file(tmp.path().join("warren/x/pids.max")).unwrap();
    // No pids limit asked for: creating works, and pids is not enabled.
    let limits = CgroupLimits {
        memory_bytes: Some(1 << 30),
        ..CgroupLimits::default()
    };
    let cgroup = Cgroup::create(&layout, "warren", "x", &limits).unwrap();
    assert_eq!(
        read(tmp.path().join("cgroup.subtree_control")),
        "+memory +cpu"
    );
    // Asking for it names the controller and the file.
    let err = cgroup
        .update(&CgroupLimits {
            pids: Some(5),
            ..CgroupLimits::default()
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            CgroupError::ControllerUnavailable {
                controller: "pids",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("warren/x/pids.max"), "{err}");
}

#[test]
fn v2_missing_cgroup_is_an_error_not_a_missing_controller() {
    let (tmp, layout) = fake_v2("cpu memory pids\n");
    let gone = Cgroup::open(&layout, "warren", "gone");
    let err = gone.update(&all_limits()).unwrap_err();
    assert!(matches!(err, CgroupError::Write { .. }), "{err}");
    assert!(gone.stats().is_err());
    assert!(gone.pids().is_err());
    gone.kill_all().unwrap();
    gone.remove().unwrap();
    assert!(tmp.path().join("warren").exists());
}

#[test]
fn v1_pause_freezes_and_resume_thaws() {
    let (tmp, layout) = fake_v1();
    let cgroup = Cgroup::open(&layout, "warren", "x");
    let state = tmp.path().join("freezer/warren/x/freezer.state");
    assert!(!cgroup.paused().unwrap());
    // The fake reads back what was written: FROZEN at once.
    cgroup.pause().unwrap();
    assert_eq!(read(&state), "FROZEN");
    assert!(cgroup.paused().unwrap());
    // Asked to freeze but not there yet counts as paused (resume must thaw it).
    fs::write(&state, "FREEZING\n").unwrap();
    assert!(cgroup.paused().unwrap());
    cgroup.resume().unwrap();
    assert_eq!(read(&state), "THAWED");
    assert!(!cgroup.paused().unwrap());
    // Without the freezer hierarchy: a clear error, and never paused.
    let CgroupLayout::V1 { mut mounts } = layout else {
        unreachable!()
    };
    mounts.remove("freezer");
    let layout = CgroupLayout::V1 { mounts };
    let cgroup = Cgroup::open(&layout, "warren", "x");
    let err = cgroup.pause().unwrap_err();
    assert!(matches!(err, CgroupError::NoFreezer { .. }), "{err}");
    assert!(
        err.to_string().contains("freezer hierarchy is not mounted"),
        "{err}"
    );
    assert!(!cgroup.paused().unwrap());
    cgroup.resume().unwrap();
}

#[test]
fn v2_pause_waits_for_the_kernel_to_report_frozen() {
    let (tmp, layout) = fake_v2("cpu memory pids\n");
    let cgroup = Cgroup::open(&layout, "warren", "x");
    let x = tmp.path().join("warren/x");
    put(&x.join("cgroup.events"), "populated 1\nfrozen 1\n");
    cgroup.pause().unwrap();
    assert_eq!(read(x.join("cgroup.freeze")), "1");
    assert!(cgroup.paused().unwrap());
    cgroup.resume().unwrap();
    assert_eq!(read(x.join("cgroup.freeze")), "0");
    // The kernel never says frozen: given up on, and thawed again.
    put(&x.join("cgroup.events"), "populated 1\nfrozen 0\n");
    let err = cgroup.pause_within(Duration::from_millis(30)).unwrap_err();
    assert!(matches!(err, CgroupError::NotFrozen { .. }), "{err}");
    assert_eq!(read(x.join("cgroup.freeze")), "0");
    // No cgroup.freeze (Linux before 5.2): no freezer.
    fs::remove_file(x.join("cgroup.freeze")).unwrap();
    let err = cgroup.pause().unwrap_err();
    assert!(matches!(err, CgroupError::NoFreezer { .. }), "{err}");
}
