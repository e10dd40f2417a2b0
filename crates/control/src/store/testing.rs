//! Test helpers: a real, private etcd for one test, on free loopback ports in a temp dir, for
//! this crate's tests and for other crates' (which depend on `warren-control`).
//!
//! [`EtcdServer::start`] returns `None`, saying so loudly on stderr, only when the `etcd`
//! binary is not installed (`scripts/install-etcd.sh` installs it). The process is killed and
//! its data dir removed when the value is dropped, even when the test fails. [`EtcdServer::pause`]
//! (SIGSTOP) makes the store unreachable without closing its sockets (connections hang, as with
//! a dead host); [`EtcdServer::kill`] and [`EtcdServer::restart`] stop it and start it again on
//! the same ports and data.

#![doc(hidden)]

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One single-member etcd cluster on 127.0.0.1.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    paused: bool,
}

/// Whether `etcd` can be run; `scripts/install-etcd.sh` installs it.
pub fn etcd_installed() -> bool {
    Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdServer {
    /// Starts etcd and waits until it answers `/health`. `None` when etcd is not installed.
    ///
    /// # Panics
    /// When etcd is installed but does not start (a test should fail then, not skip).
    pub fn start() -> Option<Self> {
        if !etcd_installed() {
            eprintln!("\n*** SKIPPED: `etcd` is not installed (run scripts/install-etcd.sh) ***\n");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("warren-etcd-")
            .tempdir()
            .expect("temp dir for etcd");
        // A port picked free can be taken before etcd binds it: try a few pairs.
        let mut last = String::new();
        let mut server = EtcdServer {
            child: None,
            dir,
            client_port: 0,
            peer_port: 0,
            paused: false,
        };
        for _ in 0..5 {
            server.client_port = free_port().expect("free port");
            server.peer_port = free_port().expect("free port");
            match server.spawn() {
                Ok(()) => return Some(server),
                Err(e) => last = e,
            }
        }
        panic!("etcd did not start: {last}");
    }

    /// `127.0.0.1:PORT` of the client API.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// `etcd://127.0.0.1:PORT`, as `warren server --store` takes it.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.endpoint())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// etcd's own output, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("etcd log: {e}"))?;
        let err = log.try_clone().map_err(|e| format!("etcd log: {e}"))?;
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .arg("--name=warren-test")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=warren-test={peer}"))
            .arg("--initial-cluster-state=new")
            // No metrics listener beyond the client port, no snapshots to speak of.
            .arg("--snapshot-count=100000")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn etcd: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("etcd exited ({status}):\n{}", self.log()));
            }
            if healthy(self.client_port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        Err(format!("etcd not healthy within 20 s:\n{}", self.log()))
    }

    /// SIGSTOP: etcd keeps its sockets but answers nothing (a hung or partitioned store).
    pub fn pause(&mut self) {
        self.signal("STOP");
        self.paused = true;
    }

    /// SIGCONT after [`EtcdServer::pause`].
    pub fn resume(&mut self) {
        self.signal("CONT");
        self.paused = false;
    }

    fn signal(&self, name: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{name}"))
                .arg(child.id().to_string())
                .status();
        }
    }

    /// SIGKILL and reap: the store is gone (connections are refused).
    pub fn kill(&mut self) {
        if self.paused {
            self.resume();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data dir.
    ///
    /// # Panics
    /// When it does not come back.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.spawn() {
            panic!("etcd did not restart: {e}");
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// `GET /health` answers `{"health":"true"}` once etcd serves.
fn healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains("\"health\":\"true\"")
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
