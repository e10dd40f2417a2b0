//! A client's socket writes raise no SIGPIPE (`warren_control::socket`). This binary gives
//! SIGPIPE its default action, as the CLI does, so a write that raised it would kill the test
//! binary (a failure) instead of returning `EPIPE`. One test, alone in its binary: the
//! action is process-wide.

use std::io::{ErrorKind, IoSlice};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use warren_control::socket::ClientStream;

#[allow(unsafe_code)]
fn default_sigpipe() {
    // SAFETY: the default action is not a handler; nothing else here touches signals.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[tokio::test]
async fn writes_to_a_closed_peer_fail_with_epipe_instead_of_a_signal() {
    default_sigpipe();

    let (mine, peer) = tokio::net::UnixStream::pair().expect("socket pair");
    drop(peer);
    let mut stream = ClientStream::Unix(mine);
    let err = stream.write_all(b"x").await.expect_err("the peer is gone");
    assert_eq!(err.kind(), ErrorKind::BrokenPipe, "{err}");
    let err = stream
        .write_vectored(&[IoSlice::new(b"a"), IoSlice::new(b"b")])
        .await
        .expect_err("the peer is gone");
    assert_eq!(err.kind(), ErrorKind::BrokenPipe, "{err}");

    // TCP: the first write after the peer closed draws a reset, a later one EPIPE.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mine = tokio::net::TcpStream::connect(listener.local_addr().expect("address"))
        .await
        .expect("connect");
    drop(listener.accept().await.expect("accept"));
    let mut stream = ClientStream::Tcp(mine);
    let mut errors = Vec::new();
    for _ in 0..100 {
        match stream
            .write_vectored(&[IoSlice::new(b"a"), IoSlice::new(b"b")])
            .await
        {
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => {
                errors.push(e.kind());
                if e.kind() == ErrorKind::BrokenPipe {
                    break;
                }
            }
        }
    }
    assert_eq!(errors.last(), Some(&ErrorKind::BrokenPipe), "{errors:?}");
}
