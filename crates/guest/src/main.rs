//! `warren-guest`: PID 1 inside a warren microVM.
//!
//! It mounts what a Linux userland expects, loads the VM's virtio modules, opens the
//! virtio-serial port to the host and serves the task API (`warren.guest.v1`, tonic) on it
//! for the VM's whole life, one HTTP/2 connection per host connection (or listens on the
//! vsock port its kernel command line names, `warren.vsock=PORT`). It starts the
//! sandbox's workload and `exec` processes (in the workload's cgroup, in the image's root
//! when there is one), keeps the workload's output for the host, reaps every orphan, and
//! ends the VM by rebooting (qemu runs with `-no-reboot`, so that is qemu's exit).
//!
//! Outside a VM (`warren-guest --listen-unix PATH`) it serves the same API on a unix socket
//! without touching the machine (no mounts, cgroups, hostname or reboot): how its tests run
//! it on a host.

mod exec;
mod init;
mod port;
mod process;
mod service;
mod sys;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use warren_guest::proto;

/// How long PID 1 waits for the port to appear before giving up (and ending the VM).
const PORT_PATIENCE: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let pid1 = std::process::id() == 1;
    let args: Vec<String> = std::env::args().skip(1).collect();
    if pid1 {
        init::early();
        sys::watch_spawns();
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("warren-guest: cannot start the runtime: {e}");
            if pid1 {
                sys::reboot();
            }
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(serve(pid1, &args));
    if let Err(e) = &result {
        eprintln!("warren-guest: {e}");
    }
    if pid1 {
        sys::reboot();
    }
    if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn serve(pid1: bool, args: &[String]) -> Result<(), String> {
    let guest = Arc::new(service::Guest::new(pid1));
    tokio::spawn(Arc::clone(&guest.reaper).run());
    let svc = proto::guest_server::GuestServer::new(service::GuestService { guest })
        .max_decoding_message_size(64 << 20);
    let router = tonic::transport::Server::builder().add_service(svc);
    match args {
        [flag, path] if flag == "--listen-unix" => {
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path)
                .map_err(|e| format!("listen on {path}: {e}"))?;
            router
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
                .await
                .map_err(|e| format!("serve: {e}"))
        }
        [] if pid1 => {
            let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
            if let Some(port) = warren_guest::vsock_port(&cmdline) {
                let port = port?;
                let listener = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
                    tokio_vsock::VMADDR_CID_ANY,
                    port,
                ))
                .map_err(|e| format!("listen on vsock port {port}: {e}"))?;
                eprintln!("{}", warren_guest::WAITING_FOR_HOST);
                // Each host connection is a connection of its own: nothing stale to skip,
                // no greeting.
                return router
                    .serve_with_incoming(listener.incoming())
                    .await
                    .map_err(|e| format!("serve: {e}"));
            }
            let port = port::open(warren_guest::PORT_NAME, PORT_PATIENCE)
                .await
                .map_err(|e| e.to_string())?;
            // One connection per host connection, for ever: the next is handed out once
            // tonic dropped the last and a host is there again.
            let incoming = futures::stream::unfold(
                (port, None::<tokio::sync::oneshot::Receiver<()>>),
                |(port, last)| async move {
                    if let Some(closed) = last {
                        let _ = closed.await;
                    }
                    // The host saving a template waits for this line on the console and
                    // pauses the VM without ever connecting: a clone then starts here, and
                    // its host's connection is the port's first.
                    eprintln!("{}", warren_guest::WAITING_FOR_HOST);
                    loop {
                        port.host_connected().await;
                        let (mut conn, closed) = match port.connection() {
                            Ok(c) => c,
                            Err(e) => {
                                eprintln!("warren-guest: the port: {e}");
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            }
                        };
                        match port::greet(&mut conn).await {
                            Ok(()) => {
                                return Some((Ok::<_, std::io::Error>(conn), (port, Some(closed))));
                            }
                            Err(e) => {
                                eprintln!("warren-guest: no greeting from the host: {e}");
                                drop(conn);
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    }
                },
            );
            router
                .serve_with_incoming(incoming)
                .await
                .map_err(|e| format!("serve: {e}"))
        }
        _ => Err("usage: warren-guest (as PID 1 in a VM) | warren-guest --listen-unix PATH".into()),
    }
}
