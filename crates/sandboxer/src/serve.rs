//! Configuration, sockets, systemd readiness and graceful shutdown.
//!
//! Start-up: the warren plane (store, backends, recovery, its API socket) -> the pods it
//! already holds -> containerd's socket -> `READY=1` to systemd -> serve. On shutdown both
//! APIs stop accepting, waiters are answered `UNAVAILABLE`, in-flight calls finish, and both
//! sockets are removed.

use std::ffi::OsStr;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server as TonicServer;
use tracing::{info, warn};
use warren_control::{Address, Server, ServerConfig, ServerError, WasmConfig};
use warren_runtime::SlotCapacity;

use crate::api::services::sandbox::v1::controller_server::ControllerServer;
use crate::controller::Service;

/// How long in-flight calls may take to finish after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// containerd's end when none is given.
pub const DEFAULT_LISTEN: &str = "unix:///run/warren/sandboxer.sock";
/// State directory when none is given.
pub const DEFAULT_DIR: &str = "/var/lib/warren-sandboxer";

/// The flags of `warren sandboxer` and `resource-slot-sandboxer` (which adds `--log-level`;
/// `warren` has it as a global flag).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Socket containerd connects to: unix:///path.sock or a plain path (the address of the
    /// `[proxy_plugins.NAME]` in containerd's config).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// State directory: the store (state.redb), slot/<id>/resources.json, and by default the
    /// warren API socket warren.sock.
    #[arg(long, default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Backend of the pods. Only `slot` (accounting, the ResourceSlot behaviour) so far.
    #[arg(long, default_value = "slot")]
    pub backend: String,
    /// Where warren's own gRPC API is served, for `warren ls` and friends: unix:///path.sock.
    /// Default: unix://<dir>/warren.sock.
    #[arg(long, value_name = "ADDR")]
    pub api_listen: Option<String>,
    /// This sandboxer's name, set as the label warren.dev/sandboxer on its sandboxes.
    #[arg(long, default_value = "warren")]
    pub name: String,
}

/// What [`run`] needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: PathBuf,
    pub dir: PathBuf,
    pub api_listen: Address,
    pub name: String,
}

impl Args {
    /// Checks the flags; the message names the flag and the value.
    pub fn config(&self) -> Result<Config, SandboxerError> {
        let flag = |flag: &'static str, value: &str, reason: String| SandboxerError::Flag {
            flag,
            value: value.to_string(),
            reason,
        };
        if self.backend != "slot" {
            return Err(flag(
                "--backend",
                &self.backend,
                "the sandboxer supports only the \"slot\" backend so far".into(),
            ));
        }
        let listen = match self.listen.parse::<Address>() {
            Ok(Address::Unix(p)) => p,
            Ok(Address::Tcp(_)) => {
                return Err(flag(
                    "--listen",
                    &self.listen,
                    "containerd's proxy plugins connect to a unix socket: give unix:///path.sock"
                        .into(),
                ));
            }
            Err(e) => return Err(flag("--listen", &self.listen, e)),
        };
        let api_listen = match &self.api_listen {
            None => Address::Unix(self.dir.join("warren.sock")),
            Some(a) => match a.parse::<Address>() {
                Ok(Address::Unix(p)) => Address::Unix(p),
                Ok(Address::Tcp(_)) => {
                    return Err(flag(
                        "--api-listen",
                        a,
                        "only a unix socket (TCP would need a token)".into(),
                    ));
                }
                Err(e) => return Err(flag("--api-listen", a, e)),
            },
        };
        if self.name.is_empty() {
            return Err(flag("--name", &self.name, "must not be empty".into()));
        }
        // It becomes the value of the label its sandboxes are found by at a restart.
        if let Err(e) = warren_spec::validate_label_value("--name", &self.name) {
            let reason = match e {
                warren_spec::SpecError::Invalid { reason, .. } => reason,
                other => other.to_string(),
            };
            return Err(flag("--name", &self.name, reason));
        }
        Ok(Config {
            listen,
            dir: self.dir.clone(),
            api_listen,
            name: self.name.clone(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxerError {
    #[error("{flag} {value:?}: {reason}")]
    Flag {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("cannot start the warren plane in the state directory")]
    Plane(#[source] ServerError),
    #[error("cannot serve containerd's sandbox API")]
    Listen(#[source] ServerError),
    #[error("serving containerd's sandbox API failed")]
    Serve(#[source] tonic::transport::Error),
    #[error("warren's API stopped with an error")]
    Api(#[source] ServerError),
}

/// The warren plane as `warren server --dir` builds it, minus metrics (a second server on
/// the node would fight over the default metrics port).
fn server_config(config: &Config) -> ServerConfig {
    ServerConfig {
        dir: config.dir.clone(),
        listen: config.api_listen.clone(),
        token: None,
        node: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "local".to_string()),
        slot_capacity: SlotCapacity::default(),
        slot_dir: None,
        linux_dir: None,
        wasm: WasmConfig {
            // The sandboxer runs slot pods only: keep the Wasm pool (unused) small.
            pool_instances: 1,
            ..WasmConfig::default()
        },
        default_grace: Duration::from_secs(10),
        linux_supervisor: warren_control::LinuxConfig::default_supervisor(),
        cgroup_parent: "warren".to_string(),
        linux_warm: Vec::new(),
        vm_warm: Vec::new(),
        criu: None,
        restore_timeout: warren_control::DEFAULT_RESTORE_TIMEOUT,
        checkpoint_key: None,
        linux_egress_range: warren_control::server::DEFAULT_EGRESS_RANGE.to_string(),
        metrics_listen: None,
        metrics_required: false,
        // A stored policy named `default`, if one is applied through --api-listen.
        default_policy: None,
        cluster: Default::default(),
        vm: Err("the sandboxer runs slot pods only".to_string()),
    }
}

/// Tells systemd (`Type=notify`) that the service is ready, when `$NOTIFY_SOCKET` is set.
/// Returns whether a notification was sent.
pub fn notify_ready() -> std::io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) => notify(&socket, "READY=1").map(|()| true),
        None => Ok(false),
    }
}

/// Sends one sd_notify message to `socket` (a path, or `@name` for an abstract socket).
pub fn notify(socket: &OsStr, message: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let sock = UnixDatagram::unbound()?;
    match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(message.as_bytes(), &addr)?;
        }
        None => {
            sock.send_to(message.as_bytes(), socket)?;
        }
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without signal handlers the process can still be stopped by SIGKILL; run on.
        _ => std::future::pending().await,
    }
}

/// Serves containerd's sandbox API and warren's own API until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SandboxerError> {
    let server = Server::bind(server_config(&config))
        .await
        .map_err(SandboxerError::Plane)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let service = Service::new(&config.name, server.plane().clone(), stop_rx.clone());
    // Owner-only, bound under a temporary name and renamed into place; a live socket is
    // refused, a stale one (a killed sandboxer's) replaced.
    let listen = Address::Unix(config.listen.clone());
    let listener = match warren_control::server::bind_unix(&config.listen, &listen).await {
        Ok(l) => l,
        Err(e) => {
            // Release warren's socket and store: serve it for no time at all.
            let _ = server.run(async {}).await;
            return Err(SandboxerError::Listen(e));
        }
    };
    let api_address = server.address().clone();
    let mut api_stop = stop_rx.clone();
    let api = tokio::spawn(server.run(async move {
        let _ = api_stop.wait_for(|s| *s).await;
    }));
    info!(
        listen = %config.listen.display(),
        api = %api_address,
        dir = %config.dir.display(),
        "warren sandboxer listening"
    );
    // One line on stdout for scripts and tests.
    println!(
        "warren sandboxer listening on unix://{} (warren API on {api_address})",
        config.listen.display()
    );
    match notify_ready() {
        Ok(true) => info!("told systemd we are ready"),
        Ok(false) => {}
        Err(e) => warn!(error = %e, "could not notify systemd"),
    }
    let signal = {
        let stop_tx = stop_tx.clone();
        async move {
            shutdown.await;
            info!("shutting down: finishing in-flight calls");
            let _ = stop_tx.send(true);
        }
    };
    let serve = TonicServer::builder()
        .add_service(ControllerServer::new(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), signal);
    // Graceful, but bounded: a client that keeps its connection open after the GOAWAY must
    // not keep the sandboxer (and its store lock) alive.
    let mut stopping = stop_rx.clone();
    let served = tokio::select! {
        r = serve => r,
        _ = async {
            let _ = stopping.wait_for(|s| *s).await;
            tokio::time::sleep(STOP_GRACE).await;
        } => {
            warn!("calls still open {STOP_GRACE:?} after the shutdown began; stopping anyway");
            Ok(())
        }
    };
    if let Err(e) = std::fs::remove_file(&config.listen) {
        warn!(path = %config.listen.display(), error = %e, "could not remove the socket");
    }
    // Also when serving failed: warren's API must stop and release the store.
    let _ = stop_tx.send(true);
    let api = tokio::time::timeout(STOP_GRACE, api).await;
    served.map_err(SandboxerError::Serve)?;
    match api {
        Ok(Ok(r)) => r.map_err(SandboxerError::Api)?,
        Ok(Err(e)) => warn!(error = %e, "warren's API task ended abnormally"),
        Err(_) => warn!("warren's API did not stop within {STOP_GRACE:?}; stopping anyway"),
    }
    info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(listen: &str) -> Args {
        Args {
            listen: listen.into(),
            dir: "/tmp/x".into(),
            backend: "slot".into(),
            api_listen: None,
            name: "warren".into(),
        }
    }

    #[test]
    fn flags_are_checked_and_named() {
        let c = args("/run/s.sock").config().unwrap();
        assert_eq!(c.listen, PathBuf::from("/run/s.sock"));
        assert_eq!(c.api_listen, Address::Unix("/tmp/x/warren.sock".into()));
        let c = args("unix:///run/s.sock").config().unwrap();
        assert_eq!(c.listen, PathBuf::from("/run/s.sock"));
        let e = args("tcp://127.0.0.1:1").config().unwrap_err().to_string();
        assert!(
            e.contains("--listen") && e.contains("tcp://127.0.0.1:1"),
            "{e}"
        );
        let mut a = args("/s.sock");
        a.backend = "linux".into();
        let e = a.config().unwrap_err().to_string();
        assert!(e.contains("--backend") && e.contains("linux"), "{e}");
        let mut a = args("/s.sock");
        a.api_listen = Some("tcp://127.0.0.1:9".into());
        let e = a.config().unwrap_err().to_string();
        assert!(e.contains("--api-listen"), "{e}");
        let mut a = args("/s.sock");
        a.name = "my sandboxer".into();
        let e = a.config().unwrap_err().to_string();
        assert!(
            e.contains("--name") && e.contains("\"my sandboxer\""),
            "{e}"
        );
    }

    #[test]
    fn notify_sends_ready_to_a_path_and_an_abstract_socket() {
        use std::os::unix::net::UnixDatagram;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        notify(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("warren-test-notify-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        notify(OsStr::new(&format!("@{name}")), "READY=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
