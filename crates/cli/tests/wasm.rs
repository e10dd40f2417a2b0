//! The wasm backend end to end: the real server and CLI running WAT modules.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, json, stderr, with_client};

/// A test module's path, without `..` (the server names a module file where it is).
fn module(name: &str) -> String {
    let path = format!(
        "{}/../wasm/tests/modules/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::canonicalize(&path)
        .map(|p| p.display().to_string())
        .unwrap_or(path)
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn run_wait_streams_output_and_propagates_the_exit_code() {
    let server = TestServer::start();
    let out = server.warren(&[
        "run",
        "-b",
        "wasm",
        "--module",
        &module("hello.wat"),
        "--name",
        "h",
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello\n");
    let got = json(&server.ok(&["get", "h", "-o", "json"]));
    assert_eq!(got["status"]["phase"], "Exited");
    assert_eq!(got["status"]["exitCode"], 0);
    assert_eq!(server.ok(&["logs", "h"]), "hello\n", "logs after the end");

    let out = server.warren(&[
        "run",
        "-b",
        "wasm",
        "--module",
        &module("exit3.wat"),
        "--name",
        "e",
        "--wait",
        "--rm",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        server.warren(&["get", "e"]).status.code() == Some(1),
        "--rm deleted it"
    );

    let out = server.warren(&[
        "run",
        "-b",
        "wasm",
        "--module",
        &module("echo.wat"),
        "--name",
        "args",
        "-e",
        "GREETING=hi",
        "--wait",
        "--",
        "one",
        "two",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "echo.wat\none\ntwo\nGREETING=hi\n",
        "argv and only the spec's env"
    );
}

#[test]
fn wasi_preview2_components_run_too() {
    let server = TestServer::start();
    let out = server.warren(&[
        "run",
        "-b",
        "wasm",
        "--module",
        &module("component_hello.wat"),
        "--name",
        "c",
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello\n");
    let out = server.warren(&[
        "run",
        "-b",
        "wasm",
        "--module",
        &module("component_err.wat"),
        "--wait",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "run returning err is exit code 1: {}",
        stderr(&out)
    );
}

#[test]
fn relative_module_paths_are_the_callers() {
    let server = TestServer::start();
    let dir = std::path::Path::new(&module("hello.wat"))
        .parent()
        .expect("dir")
        .to_path_buf();
    let mut cmd = std::process::Command::new(common::WARREN);
    cmd.args(["run", "-b", "wasm", "--module", "hello.wat", "--wait"])
        .current_dir(&dir)
        .env("WARREN_SERVER", &server.address);
    let out = common::run_with_stdin(cmd, None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello\n");
}

#[test]
fn timeout_fails_the_sandbox_promptly() {
    let server = TestServer::start();
    let started = Instant::now();
    let out = server.warren(&[
        "run",
        "-b",
        "wasm",
        "--module",
        &module("loop.wat"),
        "--name",
        "spin",
        "--timeout",
        "300ms",
        "--wait",
    ]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("sandbox/spin failed: Timeout"),
        "{}",
        stderr(&out)
    );
    // The CLI's own start-up and the API round trips are in this figure; the backend test
    // holds the tight bound (timeout + 50 ms).
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let got = json(&server.ok(&["get", "spin", "-o", "json"]));
    assert_eq!(got["status"]["phase"], "Failed");
    assert_eq!(got["status"]["reason"], "Timeout");
}

#[test]
fn logs_follow_ends_when_the_sandbox_ends() {
    let server = TestServer::start();
    // Before the create: its 1 s timeout ends the sandbox at least 1 s after this, however
    // long the CLI takes to start here.
    let started = Instant::now();
    server.ok(&[
        "run",
        "-b",
        "wasm",
        "--module",
        &module("loop.wat"),
        "--name",
        "f",
        "--timeout",
        "1s",
    ]);
    let out = server.warren(&["logs", "-f", "f"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("looping\n"), "{}", stdout(&out));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(6),
        "followed until the end: {took:?}"
    );
    let out = server.warren(&["logs", "--tail", "1", "f"]);
    assert_eq!(stdout(&out).lines().count(), 1);
    let slot = server.warren(&["run", "--name", "s"]);
    assert!(slot.status.success());
    let out = server.warren(&["logs", "s"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("keeps no logs"), "{}", stderr(&out));
}

#[test]
fn mapped_dirs_through_the_api() {
    let server = TestServer::start();
    let data = server.dir.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::write(data.join("input.txt"), "from the host\n").expect("write");
    let ro = format!("/data::{}:ro", data.display());
    let out = server.warren(&[
        "run",
        "-b",
        "wasm",
        "--module",
        &module("files.wat"),
        "--mapdir",
        &ro,
        "--wait",
    ]);
    assert_eq!(
        out.status.code(),
        Some(40),
        "read works, the write is refused: {}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "from the host\n");
    assert_eq!(
        common::read(&data.join("input.txt")),
        "from the host\n",
        "host file unchanged"
    );
    let out = server.warren(&[
        "run",
        "-b",
        "wasm",
        "--module",
        &module("files.wat"),
        "--mapdir",
        "data",
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--mapdir: mount: \"data\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_modules_are_refused_and_nothing_remains() {
    let server = TestServer::start();
    let not_wasm = server.dir.path().join("x.wasm");
    std::fs::write(&not_wasm, "secret text").expect("write");
    // A file beyond the size a module may have (sparse: it takes no disk), and a device
    // that would never end: refused before the server reads them.
    let huge = server.dir.path().join("huge.wasm");
    std::fs::File::create(&huge)
        .and_then(|f| f.set_len((512 << 20) + 1))
        .expect("sparse file");
    let fifo = server.dir.path().join("fifo.wasm");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    // A writer waits in open() until someone opens the FIFO to read: the server must not
    // (nor any device: it looks at what a path is before opening it).
    let (opened, writer_opened) = std::sync::mpsc::channel();
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let file = std::fs::OpenOptions::new().write(true).open(&fifo);
            let _ = opened.send(());
            file
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let cases = [
        (huge.display().to_string(), "larger than the 512 MiB"),
        (fifo.display().to_string(), "not a regular file"),
        ("/dev/zero".to_string(), "not a regular file"),
        (
            not_wasm.display().to_string(),
            "is not a WebAssembly module",
        ),
        (module("nostart.wat"), "has no `_start` function"),
        ("/nonexistent/app.wasm".to_string(), "does not exist"),
    ];
    for (path, want) in cases {
        let out = server.warren(&["run", "-b", "wasm", "--module", &path]);
        assert_eq!(out.status.code(), Some(1));
        let err = stderr(&out);
        assert!(err.contains(&path) && err.contains(want), "{err}");
        assert!(!err.contains("secret text"), "{err}");
    }
    let server_opened_the_fifo = writer_opened.try_recv().is_ok();
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        // Let the writer go (and end its thread) whatever happened.
        let _reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .expect("open the FIFO to read");
        writer.join().expect("writer").expect("writer's open");
    }
    assert!(!server_opened_the_fifo, "the server opened the FIFO");
    // A server's message quoting bytes that would drive the terminal shows them escaped.
    let out = server.warren(&[
        "run",
        "-b",
        "wasm",
        "--module",
        "/nonexistent/\u{1b}[2J.wasm",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        !err.contains('\u{1b}') && err.contains("/nonexistent/\\u{1b}[2J.wasm"),
        "{err:?}"
    );
    assert_eq!(server.ok(&["ls", "-o", "name"]), "");
}

#[test]
fn finished_sandboxes_keep_their_status_across_kill_9() {
    let mut server = TestServer::start();
    let out = server.warren(&[
        "run",
        "-b",
        "wasm",
        "--module",
        &module("exit3.wat"),
        "--name",
        "done",
        // Strong: acknowledged means on disk. A fast create is written behind (up to 2 ms),
        // so a kill -9 right after it may lose it, as documented.
        "--mode",
        "strong",
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(3));
    server.kill9();
    server.spawn();
    let got = json(&server.ok(&["get", "done", "-o", "json"]));
    assert_eq!(got["status"]["phase"], "Exited");
    assert_eq!(got["status"]["exitCode"], 3);
    assert_eq!(
        server.ok(&["logs", "done"]),
        "",
        "exit3 prints nothing; the log is still readable"
    );
    server.ok(&["rm", "done"]);
}

#[test]
fn bench_run_reports_create_to_exit() {
    let out = common::run_with_stdin(
        {
            let mut c = std::process::Command::new(common::WARREN);
            c.args([
                "bench",
                "run",
                "-i",
                &module("hello.wat"),
                "-n",
                "50",
                "-c",
                "4",
                "--peer-runs",
                "0",
                "--json",
            ])
            .env_remove("WARREN_SERVER");
            c
        },
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let v = json(text.lines().last().expect("json"));
    assert_eq!(v["warren"]["ok"], 50, "{text}");
    assert_eq!(v["warren"]["failed"], 0, "{text}");
    assert!(
        v["in_process"]["instantiate"]["p50_ns"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{text}"
    );
}

#[test]
fn stdin_from_the_api_reaches_the_workload() {
    let server = TestServer::start();
    let cat = module("cat.wat");
    // From this command's own stdin, read to its end.
    let text = "line one\nline two\n";
    let out = server.warren_stdin(
        &[
            "run", "-b", "wasm", "--module", &cat, "--stdin", "-", "--wait",
        ],
        Some(text),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), text);

    // From a file, larger than the guest's 64 KiB read buffer.
    let big: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    let file = server.dir.path().join("input.txt");
    std::fs::write(&file, &big).expect("write input");
    let file = file.display().to_string();
    let out = server.warren(&[
        "run", "-b", "wasm", "--module", &cat, "--name", "big", "--stdin", &file, "--wait",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).len(), big.len());
    assert_eq!(server.ok(&["logs", "big"]), big, "the log holds all of it");

    // None given: the guest reads end of file at once.
    let out = server.warren(&["run", "-b", "wasm", "--module", &cat, "--wait"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");

    // A backend that runs nothing refuses input, naming the field.
    let out = server.warren_stdin(&["run", "--stdin", "-"], Some("x"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("stdin: the slot backend"),
        "{}",
        stderr(&out)
    );
    let missing = server.dir.path().join("missing.txt").display().to_string();
    let out = server.warren(&["run", "-b", "wasm", "--module", &cat, "--stdin", &missing]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--stdin") && stderr(&out).contains(&missing));
}

/// `wait` on the create: one call that returns the sandbox's end.
#[test]
fn create_can_wait_for_the_end() {
    use warren_proto::{spec_to_pb, v1};
    let server = TestServer::start();
    with_client(&server.address, async |mut client| {
        let spec = |name: &str, module_file: &str| warren_spec::SandboxSpec {
            name: name.into(),
            backend: warren_spec::BackendKind::Wasm,
            image: Some(module(module_file)),
            ..Default::default()
        };
        let done = client
            .create_sandbox(v1::CreateSandboxRequest {
                spec: Some(spec_to_pb(&spec("three", "exit3.wat"))),
                wait: true,
                ..Default::default()
            })
            .await
            .expect("create and wait")
            .into_inner();
        let status = done.sandbox.and_then(|s| s.status).expect("status");
        assert_eq!(
            (status.phase.as_str(), status.exit_code),
            ("Exited", Some(3))
        );

        let started = Instant::now();
        let err = client
            .create_sandbox(v1::CreateSandboxRequest {
                spec: Some(spec_to_pb(&spec("spin", "loop.wat"))),
                wait: true,
                wait_timeout_ms: Some(300),
                stdin: Vec::new(),
            })
            .await
            .expect_err("the wait times out");
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    });
    // The sandbox itself runs on after the caller stopped waiting.
    let got = json(&server.ok(&["get", "spin", "-o", "json"]));
    assert_eq!(got["status"]["phase"], "Running");
    // Paused and unpaused (the backend test checks that a paused guest runs nothing).
    assert_eq!(server.ok(&["pause", "spin"]), "spin\n");
    let got = json(&server.ok(&["get", "spin", "-o", "json"]));
    assert_eq!(got["status"]["paused"], true);
    assert_eq!(server.ok(&["unpause", "spin"]), "spin\n");
    let got = json(&server.ok(&["get", "spin", "-o", "json"]));
    assert_eq!(got["status"].get("paused"), None);
    server.ok(&["pause", "spin"]);
    server.ok(&["rm", "spin"]);
}

/// Modules stored in the image store run by name: an artifact imported from a bare module,
/// an OCI layout holding a Wasm artifact, and a runwasi-style image (a `.wasm` entrypoint).
#[test]
fn modules_run_by_image_name() {
    let server = TestServer::start();
    let hello = module("hello.wat");
    let out = server.ok(&["image", "import", &hello, "--name", "hello"]);
    assert!(out.contains("hello:latest"), "{out}");
    let listed = server.ok(&["image", "ls"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("hello:latest") && l.contains("wasm")),
        "{listed}"
    );
    let out = server.warren(&["run", "-b", "wasm", "--module", "hello", "--wait"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello\n");

    let echo = wat::parse_file(module("echo.wat")).expect("echo.wat compiles");
    let layouts = server.dir.path().join("layouts");
    let artifact = warren_image::testing::wasm_layout(&layouts.join("a"), "echo-artifact", &echo)
        .expect("artifact layout");
    server.ok(&["image", "import", &artifact.display().to_string()]);
    let out = server.warren(&[
        "run",
        "-b",
        "wasm",
        "--module",
        "echo-artifact",
        "--wait",
        "--",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "echo-artifact\nx\n",
        "argv[0] is the image name"
    );

    let runwasi =
        warren_image::testing::wasm_in_scratch_layout(&layouts.join("r"), "echo-image", &echo)
            .expect("runwasi layout");
    server.ok(&["image", "import", &runwasi.display().to_string()]);
    let out = server.warren(&["run", "-b", "wasm", "--module", "echo-image", "--wait"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "/app.wasm\n",
        "argv is the image's entrypoint"
    );

    // A container image is not a module; a name that is nothing is said to be nothing.
    let bb = warren_image::testing::busybox_layout(&layouts.join("b"), "busybox")
        .expect("busybox layout");
    server.ok(&["image", "import", &bb.display().to_string()]);
    for (name, want) in [
        ("busybox", "holds no Wasm module"),
        ("nothing-here", "neither a module file"),
    ] {
        let out = server.warren(&["run", "-b", "wasm", "--module", name]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let err = stderr(&out);
        assert!(
            err.contains("spec.image") && err.contains(want),
            "{name}: {err}"
        );
    }
    let bad = server.dir.path().join("bad.wasm");
    std::fs::write(&bad, "not a module").expect("write");
    let out = server.warren(&[
        "image",
        "import",
        &bad.display().to_string(),
        "--name",
        "bad",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("bad.wasm"), "{}", stderr(&out));
}

/// A sandbox whose AutoRecreate keeps failing holds one slot, as any Failed sandbox does,
/// however many re-creates fail: each failure used to give back one more slot of the node,
/// and then other sandboxes' slots.
#[test]
fn a_failing_auto_recreate_keeps_exactly_one_slot() {
    let server = TestServer::start_with(&["--local-capacity", "3"], None);
    let gone = server.dir.path().join("gone.wat");
    std::fs::copy(module("loop.wat"), &gone).expect("copy");
    let gone = gone.display().to_string();
    server.ok(&["run", "--name", "s1"]);
    server.ok(&[
        "run",
        "-b",
        "wasm",
        "--module",
        &gone,
        "--name",
        "ar",
        "--timeout",
        "1s",
        "--failure-policy",
        "AutoRecreate",
    ]);
    // Its time runs out; every re-create then fails (no module), backing off 1, 2 s...
    std::fs::remove_file(&gone).expect("rm");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server
        .ok(&["get", "ar", "-o", "json"])
        .contains("re-create on")
    {
        assert!(
            Instant::now() < deadline,
            "ar never failed a re-create: {}",
            server.ok(&["get", "ar", "-o", "json"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Two more failed re-creates (a re-create needs the third slot while ar holds one).
    std::thread::sleep(Duration::from_millis(3500));
    server.ok(&["run", "--name", "x1"]);
    let full = |name: &str| {
        let out = server.warren(&["run", "--name", name]);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains("full"), "{}", stderr(&out));
    };
    full("x2");
    server.ok(&["rm", "ar"]);
    server.ok(&["run", "--name", "x2"]);
    full("x3");
    server.ok(&["rm", "s1", "x1", "x2"]);
}
