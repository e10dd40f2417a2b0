//! Published ports (`warren run -p 8080:80`, `spec.ports[].hostPort`): the server listens
//! on the node's port and relays each TCP connection, and each UDP peer's datagrams, to the
//! container port on the sandbox's own loopback, as docker's userland proxy does.
//!
//! The sandbox needs no interface for it: a socket belongs to the network namespace it was
//! created in, so the relay's inner socket is made by a short thread that has entered the
//! sandbox's namespace (a fresh thread each time: a pooled one would carry the namespace to
//! its next job). The sandbox sees connections from `127.0.0.1` (IPv6 clients too). Ports are bound before the
//! workload starts, so a port the node already uses fails the start, naming it; they are
//! released when the workload ends, and bound again by a server that adopts a running
//! sandbox.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::{AbortHandle, JoinSet};
use tracing::debug;
use warren_runtime::BackendError;
use warren_spec::{PortSpec, Protocol};

/// A UDP peer silent this long loses its relay socket (docker's proxy waits 90 s).
const UDP_IDLE: Duration = Duration::from_secs(90);
/// Most UDP peers relayed at once per port; a new one past it replaces the least recent.
const UDP_PEERS: usize = 1024;

/// Host ports bound for a sandbox, not relaying yet.
#[derive(Debug, Default)]
pub(super) struct Bound {
    tcp: Vec<(std::net::TcpListener, u16)>,
    udp: Vec<(std::net::UdpSocket, u16)>,
    shown: Vec<String>,
}

impl Bound {
    pub(super) fn is_empty(&self) -> bool {
        self.shown.is_empty()
    }
}

/// The relays of a sandbox's ports; dropping it closes the ports and every connection.
#[derive(Debug)]
pub(super) struct Published {
    tasks: Vec<AbortHandle>,
}

impl Drop for Published {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Binds the node's side of every port with a `hostPort`: on its `hostIP`, else on every
/// address, IPv4 and IPv6 (the latter skipped on a node without IPv6), as `docker run -p`
/// does.
pub(super) fn bind(ports: &[PortSpec]) -> Result<Bound, BackendError> {
    let mut bound = Bound::default();
    for (i, p) in ports.iter().enumerate() {
        let Some(host) = p.host_port else { continue };
        let addresses = match p.host_ip {
            Some(ip) => vec![(SocketAddr::new(ip, host), false)],
            None => vec![
                (SocketAddr::from((Ipv4Addr::UNSPECIFIED, host)), false),
                (SocketAddr::from((Ipv6Addr::UNSPECIFIED, host)), true),
            ],
        };
        for (at, optional) in addresses {
            let refused = |e: std::io::Error| {
                let (field, what) = match p.host_ip {
                    Some(_) => ("hostIP", at.to_string()),
                    None => ("hostPort", host.to_string()),
                };
                BackendError::Invalid(format!(
                    "spec.ports[{i}].{field}: {what}/{} cannot be published on this node: {e}",
                    p.protocol
                ))
            };
            let socket = match listen(at, p.protocol) {
                Ok(socket) => socket,
                Err(e) if optional && no_ipv6(&e) => continue,
                Err(e) => return Err(refused(e)),
            };
            match p.protocol {
                Protocol::Tcp => bound.tcp.push((socket.into(), p.container_port)),
                Protocol::Udp => bound.udp.push((socket.into(), p.container_port)),
            }
            bound
                .shown
                .push(format!("{at}->{}/{}", p.container_port, p.protocol));
        }
    }
    Ok(bound)
}

/// A non-blocking socket bound to `at` (listening, for TCP). An IPv6 one takes IPv6 only,
/// so that the IPv4 side of the same port stays a socket of its own.
fn listen(at: SocketAddr, protocol: Protocol) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let kind = match protocol {
        Protocol::Tcp => Type::STREAM,
        Protocol::Udp => Type::DGRAM,
    };
    let socket = Socket::new(Domain::for_address(at), kind, None)?;
    if at.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if protocol == Protocol::Tcp {
        // As std's `TcpListener::bind`: a port whose last connections are in TIME_WAIT can
        // be published again at once.
        socket.set_reuse_address(true)?;
    }
    socket.bind(&at.into())?;
    if protocol == Protocol::Tcp {
        socket.listen(1024)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Whether `e` says the node has no IPv6 (the module absent, or disabled).
fn no_ipv6(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL | libc::EPROTONOSUPPORT)
    )
}

/// What `backendInfo.ports` says: `0.0.0.0:8080->80/tcp, [::]:8080->80/tcp, ...`, as
/// `docker ps` shows them.
pub(super) fn shown(bound: &Bound) -> String {
    bound.shown.join(", ")
}

/// Starts relaying `bound` into the network namespace `netns` (a namespace file: the
/// workload's `/proc/PID/ns/net`), held open until the relays end.
pub(super) fn serve(bound: Bound, netns: &std::path::Path) -> Result<Published, BackendError> {
    let netns: Arc<OwnedFd> = Arc::new(
        std::fs::File::open(netns)
            .map_err(|e| BackendError::io("open", netns, e))?
            .into(),
    );
    let mut tasks = Vec::new();
    for (listener, port) in bound.tcp {
        let listener =
            TcpListener::from_std(listener).map_err(|e| BackendError::Other(e.to_string()))?;
        tasks.push(tokio::spawn(relay_tcp(listener, Arc::clone(&netns), port)).abort_handle());
    }
    for (socket, port) in bound.udp {
        let socket = UdpSocket::from_std(socket).map_err(|e| BackendError::Other(e.to_string()))?;
        tasks.push(tokio::spawn(relay_udp(socket, Arc::clone(&netns), port)).abort_handle());
    }
    Ok(Published { tasks })
}

/// Runs `make` on a new thread inside the network namespace `netns`; the thread ends with it.
async fn in_netns<T: Send + 'static>(
    netns: &Arc<OwnedFd>,
    make: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let netns = Arc::clone(netns);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("warren-port".into())
        .spawn(move || {
            let made = nix::sched::setns(&*netns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
                .and_then(|()| make());
            let _ = tx.send(made);
        })?;
    rx.await
        .map_err(|_| std::io::Error::other("the namespace thread ended without an answer"))?
}

/// The sandbox's own loopback at `port`: IPv4, else IPv6 (a server listening on `::1` only).
async fn connect_inside(netns: &Arc<OwnedFd>, port: u16) -> std::io::Result<TcpStream> {
    let stream = in_netns(netns, move || {
        std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .or_else(|_| std::net::TcpStream::connect((Ipv6Addr::LOCALHOST, port)))
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
    })
    .await?;
    TcpStream::from_std(stream)
}

async fn relay_tcp(listener: TcpListener, netns: Arc<OwnedFd>, port: u16) {
    // Dropped with this task (the sandbox's end): every open connection goes with it.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (mut outside, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors, say: try again shortly rather than spin.
                        debug!(port, "linux: published port: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let netns = Arc::clone(&netns);
                connections.spawn(async move {
                    match connect_inside(&netns, port).await {
                        Ok(mut inside) => {
                            let _ = tokio::io::copy_bidirectional(&mut outside, &mut inside).await;
                        }
                        // The client sees the connection closed, as with nothing listening.
                        Err(e) => debug!(%peer, port, "linux: published port: nothing answers inside: {e}"),
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One UDP peer's relay: a socket in the sandbox's namespace connected to the port, and
/// when it last carried a datagram (ms since the relay started).
struct Peer {
    inside: Arc<UdpSocket>,
    used: Arc<AtomicU64>,
    replies: AbortHandle,
}

async fn relay_udp(outside: UdpSocket, netns: Arc<OwnedFd>, port: u16) {
    let outside = Arc::new(outside);
    let epoch = Instant::now();
    let now = move || epoch.elapsed().as_millis() as u64;
    let mut peers: HashMap<SocketAddr, Peer> = HashMap::new();
    let mut replies = JoinSet::new();
    let mut sweep = tokio::time::interval(UDP_IDLE / 3);
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            received = outside.recv_from(&mut buf) => {
                let Ok((n, from)) = received else { continue };
                if !peers.contains_key(&from) {
                    if peers.len() >= UDP_PEERS
                        && let Some(oldest) = peers
                            .iter()
                            .min_by_key(|(_, p)| p.used.load(Ordering::Relaxed))
                            .map(|(a, _)| *a)
                        && let Some(gone) = peers.remove(&oldest)
                    {
                        gone.replies.abort();
                    }
                    let made = in_netns(&netns, move || {
                        let s = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
                        s.connect((Ipv4Addr::LOCALHOST, port))?;
                        s.set_nonblocking(true)?;
                        Ok(s)
                    })
                    .await
                    .and_then(UdpSocket::from_std);
                    let inside = match made {
                        Ok(s) => Arc::new(s),
                        Err(e) => {
                            debug!(%from, port, "linux: published port: no relay socket: {e}");
                            continue;
                        }
                    };
                    let used = Arc::new(AtomicU64::new(now()));
                    let handle = replies.spawn(reply_to(
                        Arc::clone(&inside),
                        Arc::clone(&outside),
                        from,
                        Arc::clone(&used),
                        epoch,
                    ));
                    peers.insert(from, Peer { inside, used, replies: handle });
                }
                if let Some(peer) = peers.get(&from) {
                    peer.used.store(now(), Ordering::Relaxed);
                    let _ = peer.inside.send(&buf[..n]).await;
                }
            }
            _ = sweep.tick() => {
                let idle = UDP_IDLE.as_millis() as u64;
                let t = now();
                peers.retain(|_, p| {
                    let keep = t.saturating_sub(p.used.load(Ordering::Relaxed)) < idle;
                    if !keep {
                        p.replies.abort();
                    }
                    keep
                });
            }
            Some(_) = replies.join_next(), if !replies.is_empty() => {}
        }
    }
}

/// Sends what the sandbox answers on `inside` back to the peer `to`.
async fn reply_to(
    inside: Arc<UdpSocket>,
    outside: Arc<UdpSocket>,
    to: SocketAddr,
    used: Arc<AtomicU64>,
    epoch: Instant,
) {
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = inside.recv(&mut buf).await {
        used.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        if outside.send_to(&buf[..n], to).await.is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A network namespace of its own (`ip netns add`), removed on drop.
    struct Netns(String);

    impl Netns {
        fn new() -> Option<Netns> {
            let name = format!("warren-ports-{}", std::process::id());
            let ok = std::process::Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return None;
            }
            let ns = Netns(name);
            let up = std::process::Command::new("ip")
                .args(["-n", &ns.0, "link", "set", "lo", "up"])
                .status()
                .is_ok_and(|s| s.success());
            up.then_some(ns)
        }

        fn path(&self) -> std::path::PathBuf {
            std::path::Path::new("/run/netns").join(&self.0)
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }

    #[tokio::test]
    async fn tcp_and_udp_reach_the_namespaces_own_loopback() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: entering a network namespace needs root");
            return;
        }
        let Some(ns) = Netns::new() else {
            eprintln!("SKIP: `ip netns add` is not available here");
            return;
        };
        // Servers inside the namespace only, on ports nothing here uses: the host's own
        // loopback has nothing on them.
        let path = ns.path();
        let (tcp_port, udp_port) = in_netns(
            &Arc::new(std::fs::File::open(&path).unwrap().into()),
            || {
                let tcp = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
                let udp = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
                let ports = (tcp.local_addr()?.port(), udp.local_addr()?.port());
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    for mut conn in tcp.incoming().flatten() {
                        let mut line = [0u8; 5];
                        let _ = conn.read_exact(&mut line);
                        let _ = conn.write_all(b"tcp:");
                        let _ = conn.write_all(&line);
                    }
                });
                std::thread::spawn(move || {
                    let mut buf = [0u8; 100];
                    while let Ok((n, from)) = udp.recv_from(&mut buf) {
                        let mut reply = b"udp:".to_vec();
                        reply.extend_from_slice(&buf[..n]);
                        let _ = udp.send_to(&reply, from);
                    }
                });
                Ok(ports)
            },
        )
        .await
        .unwrap();
        let spec = |s: String| s.parse::<PortSpec>().unwrap();
        // Host ports: any free ones.
        let free = || {
            std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (host_tcp, host_udp) = (
            std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
                .unwrap()
                .local_addr()
                .unwrap()
                .port(),
            free(),
        );
        let bound = bind(&[
            spec(format!("{host_tcp}:{tcp_port}")),
            spec(format!("{host_udp}:{udp_port}/udp")),
        ])
        .unwrap();
        let ipv6 = std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).is_ok();
        let want = if ipv6 {
            format!(
                "0.0.0.0:{host_tcp}->{tcp_port}/tcp, [::]:{host_tcp}->{tcp_port}/tcp, \
                 0.0.0.0:{host_udp}->{udp_port}/udp, [::]:{host_udp}->{udp_port}/udp"
            )
        } else {
            eprintln!("this host has no IPv6: only the IPv4 side is tested");
            format!("0.0.0.0:{host_tcp}->{tcp_port}/tcp, 0.0.0.0:{host_udp}->{udp_port}/udp")
        };
        assert_eq!(shown(&bound), want);
        let published = serve(bound, &path).unwrap();

        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let clients: &[std::net::IpAddr] = if ipv6 {
            &[Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()]
        } else {
            &[Ipv4Addr::LOCALHOST.into()]
        };
        for (round, client) in clients.iter().enumerate() {
            let mut conn = TcpStream::connect((*client, host_tcp)).await.unwrap();
            conn.write_all(format!("ping{round}").as_bytes())
                .await
                .unwrap();
            let mut got = String::new();
            conn.read_to_string(&mut got).await.unwrap();
            assert_eq!(got, format!("tcp:ping{round}"));
        }
        let mut buf = [0u8; 100];
        for (round, at) in clients.iter().enumerate() {
            let client = UdpSocket::bind((*at, 0)).await.unwrap();
            client
                .send_to(format!("d{round}").as_bytes(), (*at, host_udp))
                .await
                .unwrap();
            let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
                .await
                .expect("a UDP reply")
                .unwrap();
            assert_eq!(&buf[..n], format!("udp:d{round}").as_bytes());
        }

        // Dropped (the workload's end): both ports are free again.
        drop(published);
        let deadline = Instant::now() + Duration::from_secs(5);
        while listen((Ipv4Addr::UNSPECIFIED, host_tcp).into(), Protocol::Tcp).is_err()
            || listen((Ipv4Addr::UNSPECIFIED, host_udp).into(), Protocol::Udp).is_err()
            || (ipv6 && listen((Ipv6Addr::UNSPECIFIED, host_tcp).into(), Protocol::Tcp).is_err())
            || (ipv6 && listen((Ipv6Addr::UNSPECIFIED, host_udp).into(), Protocol::Udp).is_err())
        {
            assert!(Instant::now() < deadline, "the ports stay bound");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn only_host_ports_are_bound_and_a_taken_one_is_named() {
        let taken = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let spec = |s: &str| s.parse::<PortSpec>().unwrap();
        let bound = bind(&[spec("80")]).unwrap();
        assert!(bound.is_empty());
        let err = bind(&[spec("80"), spec(&format!("{port}:80"))]).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "spec.ports[1].hostPort: {port}/tcp cannot be published on this node: "
            )),
            "{err}"
        );
    }

    #[test]
    fn a_host_address_binds_that_address_alone() {
        let free = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let spec = |s: &str| s.parse::<PortSpec>().unwrap();
        let bound = bind(&[spec(&format!("127.0.0.1:{free}:80"))]).unwrap();
        assert_eq!(shown(&bound), format!("127.0.0.1:{free}->80/tcp"));
        // Another loopback address (all of 127/8 is local) and the wildcard stay free.
        let other = std::net::TcpListener::bind((Ipv4Addr::new(127, 0, 0, 2), free));
        assert!(other.is_ok(), "127.0.0.2:{free} was taken too: {other:?}");
        drop(other);
        // A second sandbox on the same address is refused, naming the address.
        let err = bind(&[spec(&format!("127.0.0.1:{free}:81"))]).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "spec.ports[0].hostIP: 127.0.0.1:{free}/tcp cannot be published on this node: "
            )),
            "{err}"
        );
        drop(bound);
        // An address this node does not have.
        let err = bind(&[spec("192.0.2.1:8080:80/udp")]).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "spec.ports[0].hostIP: 192.0.2.1:8080/udp cannot be published on this node: "
            ),
            "{err}"
        );
        if std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).is_ok() {
            let bound = bind(&[spec(&format!("[::1]:{free}:80"))]).unwrap();
            assert_eq!(shown(&bound), format!("[::1]:{free}->80/tcp"));
            // IPv6 only: the IPv4 side of the port is free.
            assert!(std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, free)).is_ok());
        } else {
            eprintln!("this host has no IPv6: the [::1] case is not tested");
        }
    }
}
