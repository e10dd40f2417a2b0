//! The task API against the real `warren-guest` binary, served on a unix socket on the host
//! (`--listen-unix`: no mounts, cgroups or reboot), through the same tonic client the vm
//! backend uses. The VM itself is tested by the `vm` backend's tests.

#![allow(clippy::unwrap_used)] // a panic is how a test fails

use std::time::Duration;

use tokio_stream::StreamExt as _;
use warren_guest::proto::{self, guest_client::GuestClient};

struct Guest {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    client: GuestClient<tonic::transport::Channel>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn guest() -> Guest {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("guest.sock");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_warren-guest"))
        .arg("--listen-unix")
        .arg(&sock)
        .spawn()
        .unwrap();
    for _ in 0..500 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let path = sock.clone();
    let channel = tonic::transport::Endpoint::from_static("http://guest")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap();
    Guest {
        child,
        _dir: dir,
        client: GuestClient::new(channel),
    }
}

fn start(argv: &[&str]) -> proto::StartRequest {
    proto::StartRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/usr/bin:/bin".into(), "GREETING=hi there".into()],
        cwd: "/".into(),
        ..Default::default()
    }
}

/// Collects a workload's output until its exit.
async fn output(g: &mut Guest, from: [u64; 2]) -> (String, String, proto::ExitStatus) {
    let mut stream = g
        .client
        .output(proto::OutputRequest {
            stdout_offset: from[0],
            stderr_offset: from[1],
        })
        .await
        .unwrap()
        .into_inner();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let collect = async {
        while let Some(event) = stream.next().await {
            match event.unwrap().event.unwrap() {
                proto::output_event::Event::Chunk(c) if c.stream == 0 => out.extend(c.data),
                proto::output_event::Event::Chunk(c) => err.extend(c.data),
                proto::output_event::Event::Exit(e) => return e,
                proto::output_event::Event::Dropped(d) => panic!("dropped {d:?}"),
            }
        }
        panic!("the stream ended without an exit");
    };
    let exit = tokio::time::timeout(Duration::from_secs(20), collect)
        .await
        .unwrap();
    (
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
        exit,
    )
}

#[tokio::test]
async fn workload_output_exit_code_and_resume() {
    let mut g = guest().await;
    let ping = g
        .client
        .ping(proto::PingRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ping.version, warren_guest::VERSION);
    assert!(
        ping.features
            .iter()
            .any(|f| f == warren_guest::FEATURE_START_SEEDS),
        "{:?}",
        ping.features
    );
    assert!(!ping.running);
    let mut req = start(&[
        "sh",
        "-c",
        "echo \"$GREETING\"; echo oops >&2; read x; echo got $x; exit 7",
    ]);
    req.stdin = b"input\n".to_vec();
    g.client.start(req).await.unwrap();
    let (out, err, exit) = output(&mut g, [0, 0]).await;
    assert_eq!(out, "hi there\ngot input\n");
    assert_eq!(err, "oops\n");
    assert_eq!((exit.code, exit.signal), (7, 0));
    // A host that reconnects resumes from what it has: only the rest comes again.
    let (out, err, _) = output(&mut g, [9, 5]).await;
    assert_eq!((out.as_str(), err.as_str()), ("got input\n", ""));
    // Once only.
    let again = g.client.start(start(&["true"])).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn signals_and_bad_programs() {
    let mut g = guest().await;
    let missing = g
        .client
        .start(start(&["/no/such/program"]))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::InvalidArgument, "{missing:?}");
    assert!(
        missing.message().contains("/no/such/program"),
        "{missing:?}"
    );
    // A Start that seeds the CRNG needs as much entropy as Prepare, and starts nothing
    // without it.
    let short_seed = proto::StartRequest {
        seed: vec![7; 8],
        ..start(&["true"])
    };
    let err = g.client.start(short_seed).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("seed: 8 bytes"), "{err:?}");
    let bad_env = proto::StartRequest {
        env: vec!["NOEQUALS".into()],
        ..start(&["true"])
    };
    let err = g.client.start(bad_env).await.unwrap_err();
    assert!(err.message().contains("env[0]"), "{err:?}");
    g.client.start(start(&["sleep", "30"])).await.unwrap();
    let running = g
        .client
        .ping(proto::PingRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(running.running);
    g.client
        .signal(proto::SignalRequest { signal: 15 })
        .await
        .unwrap();
    let (_, _, exit) = output(&mut g, [0, 0]).await;
    assert_eq!((exit.code, exit.signal), (128 + 15, 15));
    let bad = g
        .client
        .signal(proto::SignalRequest { signal: 999 })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn exec_with_pipes_and_a_terminal() {
    use proto::exec_input::Input;
    use proto::exec_output::Output;
    let mut g = guest().await;
    let run = |g: &mut Guest, start: proto::ExecStart, stdin: Vec<Input>| {
        let mut client = g.client.clone();
        async move {
            let mut inputs = vec![proto::ExecInput {
                input: Some(Input::Start(start)),
            }];
            inputs.extend(
                stdin
                    .into_iter()
                    .map(|i| proto::ExecInput { input: Some(i) }),
            );
            let mut replies = client
                .exec(tokio_stream::iter(inputs))
                .await
                .unwrap()
                .into_inner();
            let (mut out, mut err, mut code) = (Vec::new(), Vec::new(), None);
            while let Some(r) = tokio::time::timeout(Duration::from_secs(20), replies.next())
                .await
                .unwrap()
            {
                match r.unwrap().output.unwrap() {
                    Output::Started(pid) => assert!(pid > 0),
                    Output::Stdout(b) => out.extend(b),
                    Output::Stderr(b) => err.extend(b),
                    Output::ExitCode(c) => code = Some(c),
                }
            }
            (
                String::from_utf8_lossy(&out).into_owned(),
                String::from_utf8_lossy(&err).into_owned(),
                code,
            )
        }
    };
    let (out, err, code) = run(
        &mut g,
        proto::ExecStart {
            argv: vec!["sh".into(), "-c".into(), "cat; echo e >&2; exit 4".into()],
            env: vec!["PATH=/usr/bin:/bin".into()],
            cwd: "/tmp".into(),
            ..Default::default()
        },
        vec![Input::Stdin(b"abc\n".to_vec()), Input::CloseStdin(true)],
    )
    .await;
    assert_eq!(
        (out.as_str(), err.as_str(), code),
        ("abc\n", "e\n", Some(4))
    );
    let (out, _, code) = run(
        &mut g,
        proto::ExecStart {
            argv: vec!["sh".into(), "-c".into(), "test -t 0 && stty size".into()],
            env: vec!["PATH=/usr/bin:/bin".into()],
            tty_rows: 24,
            tty_cols: 100,
            ..Default::default()
        },
        vec![],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("24 100"), "{out:?}");
    // On a terminal the end of stdin is ^D, twice after an unfinished line: wc ends, having
    // counted every byte (the terminal echoes them first).
    let (out, _, code) = run(
        &mut g,
        proto::ExecStart {
            argv: vec!["wc".into(), "-c".into()],
            env: vec!["PATH=/usr/bin:/bin".into()],
            tty_rows: 24,
            tty_cols: 80,
            ..Default::default()
        },
        vec![Input::Stdin(b"one\ntwo".to_vec()), Input::CloseStdin(true)],
    )
    .await;
    assert_eq!((out.as_str(), code), ("one\r\ntwo7\r\n", Some(0)));
}

/// The workload starts as std's `Command` would start it: a session of its own, no signal
/// blocked, SIGPIPE at its default (Rust ignores it in the guest), none of the guest's handlers.
#[tokio::test]
async fn a_workload_starts_with_default_signals_in_its_own_session() {
    let mut g = guest().await;
    g.client
        .start(start(&[
            "sh",
            "-c",
            "grep -E '^(SigBlk|SigIgn|SigCgt)' /proc/self/status; ps -o sid= -p $$ 2>/dev/null || cut -d' ' -f6 /proc/self/stat; echo pid $$",
        ]))
        .await
        .unwrap();
    let (out, _, exit) = output(&mut g, [0, 0]).await;
    assert_eq!(exit.code, 0, "{out}");
    let field = |name: &str| {
        let line = out.lines().find(|l| l.starts_with(name)).unwrap();
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    assert_eq!(field("SigBlk:"), 0, "{out}");
    let sigpipe = 1u64 << (libc::SIGPIPE - 1);
    assert_eq!(field("SigIgn:") & sigpipe, 0, "{out}");
    let pid: u64 = out
        .lines()
        .last()
        .unwrap()
        .strip_prefix("pid ")
        .unwrap()
        .parse()
        .unwrap();
    let sid: u64 = out.lines().rev().nth(1).unwrap().trim().parse().unwrap();
    assert_eq!(sid, pid, "the workload leads its own session: {out}");
}

/// A pool clone's warm-up (`Prepare`) names the disk its root is mounted from; a `Start` for
/// another disk is refused with both names, and one for the same disk goes ahead. (Outside a
/// VM the guest mounts nothing, but checks the same.)
#[tokio::test]
async fn a_start_for_another_root_device_than_prepared_is_refused() {
    let mut g = guest().await;
    g.client
        .prepare(proto::PrepareRequest {
            hostname: "clone".into(),
            sandbox_id: "sb-1".into(),
            seed: vec![7; 32],
            root_device: "serial:image-a".into(),
        })
        .await
        .unwrap();
    let err = g
        .client
        .start(proto::StartRequest {
            root_device: "serial:image-b".into(),
            ..start(&["true"])
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("\"serial:image-b\"")
            && err.message().contains("\"serial:image-a\""),
        "{}",
        err.message()
    );
    // Nothing was started: the same disk still can be.
    g.client
        .start(proto::StartRequest {
            root_device: "serial:image-a".into(),
            ..start(&["sh", "-c", "echo started"])
        })
        .await
        .unwrap();
    let (out, _, exit) = output(&mut g, [0, 0]).await;
    assert_eq!((out.as_str(), exit.code), ("started\n", 0));
}

#[tokio::test]
async fn processes_lists_the_workload_its_children_and_nothing_else() {
    let mut g = guest().await;
    let none = g
        .client
        .processes(proto::ProcessesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(none.processes.is_empty(), "{:?}", none.processes);
    g.client
        .start(start(&["sh", "-c", "sleep 31 & sleep 32; wait"]))
        .await
        .unwrap();
    // The shell's children start (and exec) a moment after it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let list = loop {
        let list = g
            .client
            .processes(proto::ProcessesRequest {})
            .await
            .unwrap()
            .into_inner()
            .processes;
        // Mid-exec a sleeper already shows its new command line but no
        // resident pages yet: wait until both have faulted some in.
        let execd = |c: &str| list.iter().any(|p| p.command == c && p.rss_bytes > 0);
        if (execd("sleep 31") && execd("sleep 32")) || tokio::time::Instant::now() >= deadline {
            break list;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Killed at the end, passed or failed: the sleepers outlive the guest otherwise.
    struct Kill(Vec<u32>);
    impl Drop for Kill {
        fn drop(&mut self) {
            for &pid in &self.0 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let _kill = Kill(list.iter().map(|p| p.pid).collect());
    let by_command = |c: &str| {
        list.iter()
            .find(|p| p.command == c)
            .unwrap_or_else(|| panic!("no {c:?} in {list:?}"))
    };
    let shell = by_command("sh -c sleep 31 & sleep 32; wait");
    assert_eq!(shell.ppid, g.child.id(), "{list:?}");
    for sleeper in ["sleep 31", "sleep 32"] {
        let p = by_command(sleeper);
        assert_eq!(p.ppid, shell.pid, "{list:?}");
        assert_eq!(p.uid, nix::unistd::getuid().as_raw(), "{p:?}");
        assert!(p.rss_bytes > 0 && !p.state.is_empty(), "{p:?}");
    }
    assert_eq!(list.len(), 3, "only the workload's processes: {list:?}");
    assert!(
        list.windows(2).all(|w| w[0].pid < w[1].pid),
        "sorted by pid: {list:?}"
    );
}
