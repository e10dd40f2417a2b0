//! `warren agent` processes for tests, on loopback or inside network namespaces joined to a
//! bridge, and a small HTTP client for the agent API. Everything (processes, namespaces,
//! veths, the bridge, temp dirs) is removed on drop, pass or fail.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{TestServer, WARREN};

/// One `warren agent` process.
pub struct TestAgent {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub name: String,
    /// `host:port` of its HTTP API.
    pub address: String,
    /// Prefix of its command line (`ip netns exec NS`), empty on the host.
    prefix: Vec<String>,
    args: Vec<String>,
}

impl TestAgent {
    /// An agent on 127.0.0.1 (a free port) for `server`, with extra flags.
    pub fn start(server: &TestServer, name: &str, extra: &[&str]) -> TestAgent {
        Self::start_at(server, name, &[], "127.0.0.1:0", extra)
    }

    /// An agent listening on `listen`, its command run under `prefix`.
    pub fn start_at(
        server: &TestServer,
        name: &str,
        prefix: &[&str],
        listen: &str,
        extra: &[&str],
    ) -> TestAgent {
        let mut agent = Self::prepare(server, name, prefix, listen, extra);
        agent.spawn(
            server
                .token
                .as_deref()
                .expect("agents need a server with a token"),
        );
        agent
    }

    /// [`TestAgent::start_at`] without starting it: its state dir can be filled first.
    pub fn prepare(
        server: &TestServer,
        name: &str,
        prefix: &[&str],
        listen: &str,
        extra: &[&str],
    ) -> TestAgent {
        let dir = tempfile::Builder::new()
            .prefix("warren-agent-it-")
            .tempdir()
            .expect("tempdir");
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--node".into(),
            name.into(),
            "--listen".into(),
            listen.into(),
            "--dir".into(),
            dir.path().join("state").display().to_string(),
            "--server".into(),
            server.address.clone(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        TestAgent {
            child: None,
            dir,
            name: name.to_string(),
            address: String::new(),
            prefix: prefix.iter().map(|s| s.to_string()).collect(),
            args,
        }
    }

    /// Gives `--server` another value (e.g. several servers, comma-separated).
    pub fn with_servers(mut self, servers: &str) -> TestAgent {
        if let Some(i) = self.args.iter().position(|a| a == "--server") {
            self.args[i + 1] = servers.to_string();
        }
        self
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts the process (again, on the same dir) and waits until it listens.
    pub fn spawn(&mut self, token: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .expect("agent log");
        let mut cmd = match self.prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(WARREN);
                c
            }
            None => Command::new(WARREN),
        };
        let mut child = cmd
            .args(&self.args)
            .env("WARREN_TOKEN", token)
            .env_remove("AGENT_CAPACITY")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn warren agent");
        let line = crate::common::stdout_lines(&mut child)
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("agent {} did not start; log:\n{}", self.name, self.log()));
        self.address = line
            .strip_prefix("warren agent listening on ")
            .expect("listening line")
            .to_string();
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Ids of the slot sandboxes whose files the agent holds.
    pub fn slot_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(self.state_dir().join("slot"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits until `f` holds, or panics with `what` after `limit`.
pub fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The state of agent `name` as `server` sees it ("" when it does not know it, or the
/// server does not answer).
pub fn node_state(server: &TestServer, name: &str) -> String {
    let out = server.warren(&["nodes", "-o", "json"]);
    if !out.status.success() {
        return String::new();
    }
    let nodes: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("`warren nodes -o json` prints JSON");
    nodes["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == name)
        .and_then(|n| n["state"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// A plain HTTP/1.1 request (one connection, closed after): the status code and the body.
pub fn http(method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
    let rest = url.strip_prefix("http://").expect("an http:// url");
    let (host, path) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
    let mut conn = std::net::TcpStream::connect(host).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut req = format!("{method} /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or_default();
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    conn.write_all(req.as_bytes()).expect("send");
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply).expect("read");
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let (head, body) = reply.split_once("\r\n\r\n").expect("a header and a body");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (
        code,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    )
}

/// The body of a chunked reply.
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Runs a command, panicking with its output when it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bridge with `n` network namespaces on it, each joined by a veth pair, on
/// 198.18.0.0/24 (the benchmarking range): the bridge is .1, namespace `i` is .(2+i).
/// Removed on drop.
pub struct Netns {
    pub bridge: String,
    pub namespaces: Vec<String>,
}

impl Netns {
    pub const BRIDGE_IP: &'static str = "198.18.0.1";

    pub fn ip(i: usize) -> String {
        format!("198.18.0.{}", 2 + i)
    }

    /// Why the test cannot run here, if it cannot.
    pub fn skip_reason() -> Option<String> {
        if !nix::unistd::geteuid().is_root() {
            return Some("SKIP: network namespaces need root".into());
        }
        if Command::new("ip").arg("-V").output().is_err() {
            return Some("SKIP: the `ip` tool (iproute2) is not installed".into());
        }
        None
    }

    pub fn create(n: usize) -> Netns {
        let tag = std::process::id() % 100_000;
        let mut net = Netns {
            bridge: format!("wbr{tag}"),
            namespaces: Vec::new(),
        };
        sh(&["ip", "link", "add", &net.bridge, "type", "bridge"]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", Self::BRIDGE_IP),
            "dev",
            &net.bridge,
        ]);
        sh(&["ip", "link", "set", &net.bridge, "up"]);
        for i in 0..n {
            let ns = format!("wns{tag}-{i}");
            let host = format!("wvh{tag}{i}");
            sh(&["ip", "netns", "add", &ns]);
            net.namespaces.push(ns.clone());
            sh(&[
                "ip", "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            sh(&["ip", "link", "set", &host, "master", &net.bridge]);
            sh(&["ip", "link", "set", &host, "up"]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", Self::ip(i)),
                "dev",
                "eth0",
            ]);
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    /// `ip netns exec NS`, to run a command inside namespace `i`.
    pub fn exec(&self, i: usize) -> Vec<&str> {
        vec!["ip", "netns", "exec", self.namespaces[i].as_str()]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth, and with it the host end.
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}
