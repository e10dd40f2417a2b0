//! The shim v2 process protocol, as containerd 1.6 and 1.7 speak it.
//!
//! `containerd-shim` 0.12's own `run` serves only `containerd.task.v3.Task` and answers `start`
//! with containerd 2.x's JSON bootstrap reply; containerd 1.6 dials that reply as a socket
//! address and calls `containerd.task.v2.Task`, so it cannot drive it. This module does the
//! three actions itself with the crate's parts (flag parsing, the generated service, the event
//! publisher, the FIFO logger):
//!
//! - `start`: spawn the serving process, wait until its socket answers, print the address;
//! - serve (no action): the Task service on `-socket`, under both the v2 and the v3 name
//!   (the messages are identical), until `Shutdown` or SIGTERM;
//! - `delete`: clean up after a shim that died: remove its sandbox from warren.
//!
//! The socket goes to `s/` beside containerd's own socket (`/run/containerd/s` for the
//! system's containerd, as runc's shim does), so a private containerd keeps to its own dir.

use std::ffi::OsString;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use containerd_shim::Flags;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::api::DeleteResponse;
use containerd_shim::protos::protobuf::Message as _;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::shim_async::{Task, create_task};
use containerd_shim::protos::ttrpc::r#async::Server;
use containerd_shim::publisher::RemotePublisher;
use sha2::{Digest as _, Sha256};

use crate::{bundle, task, warren};

const TASK_V2: &str = "containerd.task.v2.Task";
const TASK_V3: &str = "containerd.task.v3.Task";
/// How long `start` waits for the serving process to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(args: &[OsString]) -> anyhow::Result<()> {
    let flags = containerd_shim::parse(args).context("command line")?;
    if flags.version {
        println!(
            "containerd-shim-warren-v1 {} (runtime io.containerd.warren.v1)",
            env!("CARGO_PKG_VERSION")
        );
        return Ok(());
    }
    match flags.action.as_str() {
        "start" => start(&flags).await,
        "delete" => delete(&flags).await,
        "" => serve(&flags).await,
        other => bail!("unknown action {other:?} (expected start or delete)"),
    }
}

/// `unix://<dir of containerd's socket>/s/<sha256(address/namespace/id)>`.
fn socket_path(containerd_address: &str, namespace: &str, id: &str) -> PathBuf {
    let address = containerd_address.trim_start_matches("unix://");
    let dir = Path::new(address)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("/run/containerd"));
    let digest = Sha256::digest(format!("{address}/{namespace}/{id}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    dir.join("s").join(hex)
}

fn answers(socket: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(socket).is_ok()
}

async fn start(flags: &Flags) -> anyhow::Result<()> {
    // A CRI pod's tasks share one shim, as with runc's: the pod's sandbox id picks the
    // socket, so its containers find the shim their sandbox task started.
    let bundle_dir = if flags.bundle.is_empty() {
        std::env::current_dir().context("bundle dir")?
    } else {
        PathBuf::from(&flags.bundle)
    };
    let group = bundle::group_of(&bundle_dir).unwrap_or_else(|| flags.id.clone());
    let socket = socket_path(&flags.address, &flags.namespace, &group);
    let uri = format!("unix://{}", socket.display());
    if !answers(&socket) {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        }
        let _ = std::fs::remove_file(&socket);
        let exe = std::env::current_exe().context("own executable")?;
        let mut cmd = Command::new(exe);
        cmd.args(["-namespace", &flags.namespace, "-id", &flags.id])
            .args(["-address", &flags.address, "-socket", &uri]);
        if flags.debug {
            cmd.arg("-debug");
        }
        // Its own process group: signals for containerd's group do not reach it.
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("spawn the shim server")?;
        let deadline = Instant::now() + START_TIMEOUT;
        while !answers(&socket) {
            if let Some(status) = child.try_wait().context("wait for the shim server")? {
                bail!("the shim server exited at start-up ({status})");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("the shim server did not listen on {uri} within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // containerd reads it back from the bundle when it restarts.
    std::fs::write("address", &uri).context("write the address file in the bundle")?;
    let mut out = std::io::stdout();
    out.write_all(uri.as_bytes())?;
    out.flush()?;
    Ok(())
}

async fn serve(flags: &Flags) -> anyhow::Result<()> {
    if flags.socket.is_empty() {
        bail!("-socket is required to serve");
    }
    // Logs go to the `log` FIFO containerd made in the bundle; without one, nowhere.
    let _ = containerd_shim::logger::init(flags.debug, "info", &flags.namespace, &flags.id);
    let ttrpc_address =
        std::env::var("TTRPC_ADDRESS").context("TTRPC_ADDRESS (containerd sets it)")?;
    let publisher = RemotePublisher::new(&ttrpc_address)
        .await
        .with_context(|| format!("connect to containerd's events at {ttrpc_address}"))?;
    let exit = Arc::new(ExitSignal::default());
    let service: Arc<dyn Task + Send + Sync> = Arc::new(task::Service::new(
        flags.namespace.clone(),
        publisher,
        exit.clone(),
    ));
    let mut services = create_task(service.clone());
    if let Some(v3) = create_task(service).remove(TASK_V3) {
        services.insert(TASK_V2.to_string(), v3);
    }
    let mut server = Server::new()
        .bind(&flags.socket)
        .with_context(|| format!("listen on {}", flags.socket))?
        .register_service(services);
    server.start().await.context("start the ttrpc server")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = exit.wait() => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    log::info!("shim for {} shutting down", flags.id);
    let _ = server.shutdown().await;
    let _ = std::fs::remove_file(flags.socket.trim_start_matches("unix://"));
    Ok(())
}

/// After a shim died: its sandbox goes too, and containerd gets the task's last status.
async fn delete(flags: &Flags) -> anyhow::Result<()> {
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().context("bundle dir")?
    } else {
        PathBuf::from(&flags.bundle)
    };
    match bundle::load(&bundle, &flags.id, &flags.namespace) {
        Ok(plan) => {
            let token = bundle::token_for(&plan.server);
            let removed =
                match warren_control::client::connect(&plan.server, token.as_deref()).await {
                    Ok(mut client) => {
                        warren::remove_sandbox_of(&mut client, &flags.id, &flags.namespace)
                            .await
                            .map(|_| ())
                            .map_err(|e| match e {
                                containerd_shim::protos::ttrpc::Error::RpcStatus(s) => {
                                    s.message().to_string()
                                }
                                other => other.to_string(),
                            })
                    }
                    Err(e) => Err(e.to_string()),
                };
            if let Err(e) = removed {
                eprintln!("delete: sandbox {:?} left in warren: {e}", flags.id);
            }
        }
        Err(e) => eprintln!("delete: {e}"),
    }
    // A linux task's rootfs, mounted by the shim that died (a no-op for slot tasks).
    let rootfs = bundle.join("rootfs").display().to_string();
    if let Err(e) = containerd_shim::mount::umount_recursive(Some(&rootfs), libc::MNT_DETACH) {
        eprintln!("delete: unmount {rootfs}: {e}");
    }
    // A pod's containers share its shim's socket: only the pod's own task removes it.
    if bundle::group_of(&bundle).is_none_or(|g| g == flags.id) {
        let _ = std::fs::remove_file(socket_path(&flags.address, &flags.namespace, &flags.id));
    }
    let reply = DeleteResponse {
        exit_status: task::signal_status(9),
        exited_at: Some(Timestamp::now()).into(),
        ..Default::default()
    };
    let mut out = std::io::stdout();
    out.write_all(&reply.write_to_bytes()?)?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_lives_beside_containerds() {
        let p = socket_path("/tmp/ctd/containerd.sock", "default", "c1");
        assert!(p.starts_with("/tmp/ctd/s/"), "{}", p.display());
        assert_eq!(p.file_name().map(|n| n.len()), Some(64));
        assert_ne!(p, socket_path("/tmp/ctd/containerd.sock", "default", "c2"));
        assert!(socket_path("containerd.sock", "n", "i").starts_with("/run/containerd/s"));
    }
}
