//! A real `warren server` process on a temporary directory and socket, and the real `warren`
//! CLI pointed at it. Everything is removed when the test ends, pass or fail.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const WARREN: &str = env!("CARGO_BIN_EXE_warren");

pub struct TestServer {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub address: String,
    pub token: Option<String>,
    /// `http://ADDR/metrics` of the running server.
    pub metrics: Option<String>,
    extra: Vec<String>,
    /// Where a TCP server listens (`tcp://127.0.0.1:0` unless a test says).
    tcp_listen: String,
}

impl TestServer {
    /// A server on a unix socket in a fresh temp dir.
    pub fn start() -> Self {
        Self::start_with(&[], None)
    }

    /// A server with extra `warren server` flags; `tcp_token` makes it listen on TCP port 0.
    pub fn start_with(extra: &[&str], tcp_token: Option<&str>) -> Self {
        Self::start_on("tcp://127.0.0.1:0", extra, tcp_token)
    }

    /// [`TestServer::start_with`], listening on `tcp_listen` when it has a token.
    pub fn start_on(tcp_listen: &str, extra: &[&str], tcp_token: Option<&str>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("warren-it-")
            .tempdir()
            .expect("tempdir");
        let listen = match tcp_token {
            Some(_) => tcp_listen.to_string(),
            None => format!("unix://{}", dir.path().join("w.sock").display()),
        };
        let mut server = TestServer {
            child: None,
            dir,
            address: listen,
            token: tcp_token.map(str::to_string),
            metrics: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            tcp_listen: tcp_listen.to_string(),
        };
        server.spawn();
        server
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts the server process (again) on the same dir and waits until it listens.
    pub fn spawn(&mut self) {
        let listen = if self.token.is_some() {
            self.tcp_listen.clone()
        } else {
            self.address.clone()
        };
        let mut cmd = Command::new(WARREN);
        cmd.arg("server")
            .arg("--dir")
            .arg(self.state_dir())
            .arg("--listen")
            .arg(&listen);
        cmd.args(&self.extra);
        if !self.extra.iter().any(|a| a == "--metrics-listen") {
            // A free port each: tests run servers side by side.
            cmd.args(["--metrics-listen", "127.0.0.1:0"]);
        }
        if let Some(t) = &self.token {
            cmd.env("WARREN_TOKEN", t);
        } else {
            cmd.env_remove("WARREN_TOKEN");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("server log");
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn warren server");
        let rx = stdout_lines(&mut child);
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("server did not start; log:\n{}", self.log()));
        let address = line
            .strip_prefix("warren server listening on ")
            .expect("listening line")
            .to_string();
        self.address = address;
        self.metrics = rx.recv_timeout(Duration::from_secs(5)).ok().and_then(|l| {
            l.strip_prefix("warren server metrics on ")
                .map(str::to_string)
        });
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = c.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() >= deadline {
                // Taken from `self`, so Drop no longer kills it: do it before failing.
                let _ = c.kill();
                let _ = c.wait();
                panic!("server did not exit 15 s after SIGTERM (killed)");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs the CLI against this server.
    pub fn warren(&self, args: &[&str]) -> Output {
        self.warren_stdin(args, None)
    }

    pub fn warren_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        run_with_stdin(self.command(args), stdin)
    }

    /// Runs the CLI under `timeout SECS`, so a hang is a failure (exit 124), not a stuck
    /// test.
    #[allow(dead_code)]
    pub fn warren_within(&self, secs: u32, args: &[&str], stdin: Option<&str>) -> Output {
        let mut timeout = Command::new("timeout");
        timeout.arg(secs.to_string());
        run_with_stdin(wrapped(timeout, &self.command(args)), stdin)
    }

    /// The CLI with `args`, pointed at this server (and its token), not yet started.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(WARREN);
        cmd.args(args)
            .env("WARREN_SERVER", &self.address)
            .env_remove("WARREN_TOKEN");
        if let Some(t) = &self.token {
            cmd.env("WARREN_TOKEN", t);
        }
        cmd
    }

    /// Runs the CLI and asserts it succeeded; returns stdout.
    /// One `warren stats NAME` reading as JSON (CPU over 200 ms).
    #[allow(dead_code)]
    pub fn stats(&self, name: &str) -> serde_json::Value {
        let args = [
            "stats",
            name,
            "--no-stream",
            "--interval",
            "200ms",
            "-o",
            "json",
        ];
        json(&self.ok(&args))
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.warren(args);
        assert!(
            out.status.success(),
            "warren {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The child's stdout, line by line, read on a thread to its end.
pub fn stdout_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// The lines of a streaming command's stdout as they come, read by a thread of their own
/// (so that a test can wait for each with a timeout).
pub fn lines_of(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    rx
}

pub fn run_with_stdin(mut cmd: Command, stdin: Option<&str>) -> Output {
    use std::io::Write as _;
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn warren");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    }
    child.wait_with_output().expect("wait warren")
}

/// Runs `f` with a gRPC client of the server at `address`, on a runtime of its own: for
/// requests the CLI refuses before sending, and for many in flight at once.
pub fn with_client<T>(
    address: &str,
    f: impl AsyncFnOnce(warren_control::client::Client) -> T,
) -> T {
    let address: warren_control::address::Address = address.parse().expect("address");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = warren_control::client::connect(&address, None)
            .await
            .expect("connect");
        f(client).await
    })
}

/// `warren exec [FLAGS] NAME -- sleep SECONDS` whose client is killed: the process must end
/// too (nobody is left to read its output or its exit), as `warren top` shows, and be
/// reaped, not left a zombie to a pid 1 that reaps nothing: the sandbox's process count
/// (`warren stats`) comes back to what it was.
pub fn exec_ends_with_its_client(server: &TestServer, name: &str, flags: &[&str], seconds: &str) {
    let pids = || server.stats(name)["pids"].clone();
    let before = pids();
    let mut args = vec!["exec"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&[name, "--", "sleep", seconds]);
    let mut client = server
        .command(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("exec");
    let sleeper = || {
        server
            .ok(&["top", name])
            .contains(&format!("sleep {seconds}"))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sleeper() {
        assert!(Instant::now() < deadline, "exec {flags:?} never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    client.kill().expect("kill the client");
    let _ = client.wait();
    let deadline = Instant::now() + Duration::from_secs(30);
    while sleeper() {
        assert!(
            Instant::now() < deadline,
            "exec {flags:?}: the process outlived its client"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    while pids() != before {
        assert!(
            Instant::now() < deadline,
            "exec {flags:?}: {} processes, {before} before",
            pids()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The `resources.json` path the server reports for a sandbox.
pub fn resources_path(server: &TestServer, name: &str) -> PathBuf {
    let obj = json(&server.ok(&["get", name, "-o", "json"]));
    PathBuf::from(
        obj["status"]["backendInfo"]["resources_path"]
            .as_str()
            .expect("resources_path"),
    )
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A plain HTTP/1.0 GET of `http://HOST:PORT/PATH`: the status code and the body.
pub fn http_get(url: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http:// url");
    let (host, path) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
    let mut conn = std::net::TcpStream::connect(host).expect("connect");
    write!(conn, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").expect("send");
    let mut reply = String::new();
    conn.read_to_string(&mut reply).expect("read");
    let (head, body) = reply.split_once("\r\n\r\n").expect("a header and a body");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (code, body.to_string())
}

/// `cli` run by `cmd` (`timeout 5`, `sh -c ...`) as its program and arguments, with `cli`'s
/// environment.
pub fn wrapped(mut cmd: Command, cli: &Command) -> Command {
    cmd.arg(cli.get_program()).args(cli.get_args());
    for (key, value) in cli.get_envs() {
        match value {
            Some(v) => cmd.env(key, v),
            None => cmd.env_remove(key),
        };
    }
    cmd
}

/// `sh -c 'trap "" SIGNALS; exec CLI...'`: the CLI started with `signals` ignored, as
/// `nohup` (SIGHUP) or a non-interactive shell's `&` (SIGINT) starts it.
pub fn ignoring(signals: &str, cli: Command) -> Command {
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(format!("trap '' {signals}; exec \"$0\" \"$@\""));
    wrapped(sh, &cli)
}
