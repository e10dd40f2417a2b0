//! `warren exec` into a sandbox on a remote agent: `GET /api/v1/agent/exec?sandbox=ID`,
//! upgraded to a WebSocket (RFC 6455, as Kubernetes' exec does), carrying the process's stdio
//! both ways and its end.
//!
//! The conversation, after the upgrade:
//! 1. the client sends one text message, [`ExecStart`] (argv, env, cwd, user, terminal size);
//! 2. the agent starts the process and answers [`ExecEvent::Started`], or
//!    [`ExecEvent::Error`] and closes;
//! 3. then, client → agent: binary messages are stdin bytes; text ones are
//!    [`ExecControl`] (`resize`, `closeStdin`); agent → client: binary messages are output,
//!    their first byte the stream ([`STDOUT`] or [`STDERR`]), the rest its bytes;
//! 4. once the process has ended and its output is all sent, the agent sends
//!    [`ExecEvent::Exit`] and closes.
//!
//! A client that goes away (the socket closes or breaks, before or after `closeStdin`) ends
//! the process, as a local exec's caller going away does.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite;
use tracing::debug;
use warren_runtime::{ExecProcess, ExecRequest};
use warren_spec::BackendKind;

use crate::AgentError;
use crate::api::{ErrorBody, ErrorKind};
use crate::node::NodeAgent;

/// First byte of an output message from the process's stdout (or its terminal).
pub const STDOUT: u8 = 1;
/// First byte of an output message from the process's stderr.
pub const STDERR: u8 = 2;

/// The client's first message: what to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecStart {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// A terminal of this size (rows, columns) instead of pipes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<(u16, u16)>,
}

impl From<ExecRequest> for ExecStart {
    fn from(r: ExecRequest) -> Self {
        ExecStart {
            argv: r.argv,
            env: r.env,
            cwd: r.cwd,
            user: r.user,
            tty: r.tty,
        }
    }
}

impl From<ExecStart> for ExecRequest {
    fn from(s: ExecStart) -> Self {
        ExecRequest {
            argv: s.argv,
            env: s.env,
            cwd: s.cwd,
            user: s.user,
            tty: s.tty,
        }
    }
}

/// What the client sends besides stdin bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ExecControl {
    Resize {
        rows: u16,
        cols: u16,
    },
    /// End of stdin.
    CloseStdin,
}

/// What the agent sends besides output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ExecEvent {
    Started,
    /// The exit status (128 + signal when killed).
    Exit {
        code: i32,
    },
    Error {
        #[serde(flatten)]
        error: ErrorBody,
    },
}

fn text<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// The agent's side of one exec: runs it on `node` and carries it over `socket`.
pub async fn serve(
    node: Arc<NodeAgent>,
    id: String,
    backend: Option<BackendKind>,
    mut socket: WebSocket,
) {
    let refuse = |kind: ErrorKind, error: String| {
        Message::Text(
            text(&ExecEvent::Error {
                error: ErrorBody { error, kind },
            })
            .into(),
        )
    };
    let start = match socket.recv().await {
        Some(Ok(Message::Text(t))) => {
            let de = &mut serde_json::Deserializer::from_str(&t);
            serde_path_to_error::deserialize::<_, ExecStart>(de)
                .map_err(|e| format!("invalid exec start: {}: {}", e.path(), e.inner()))
        }
        _ => Err("invalid exec start: the first message must be the JSON of what to run".into()),
    };
    let start = match start {
        Ok(s) => s,
        Err(message) => {
            let _ = socket.send(refuse(ErrorKind::Invalid, message)).await;
            return;
        }
    };
    let process = match node.exec(&id, backend, start.into()).await {
        Ok(p) => p,
        Err(e) => {
            let message = warren_runtime::error_chain(&e);
            let _ = socket.send(refuse(e.kind(), message)).await;
            return;
        }
    };
    if socket
        .send(Message::Text(text(&ExecEvent::Started).into()))
        .await
        .is_err()
    {
        return;
    }
    let ExecProcess {
        mut stdin,
        stdout,
        stderr,
        resize,
        wait,
    } = process;
    let (mut sink, mut stream) = socket.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(16);
    let pumps: Vec<_> = [(STDOUT, Some(stdout)), (STDERR, stderr)]
        .into_iter()
        .filter_map(|(tag, r)| r.map(|r| (tag, r)))
        .map(|(tag, mut reader)| {
            let tx = out_tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 32 * 1024];
                buf[0] = tag;
                loop {
                    match reader.read(&mut buf[1..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let msg = Message::Binary(buf[..=n].to_vec().into());
                            if tx.send(msg).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            })
        })
        .collect();
    // Everything the process writes, then its end.
    let ender = tokio::spawn(async move {
        let code = wait.await;
        for p in pumps {
            let _ = p.await;
        }
        let last = match code {
            Ok(code) => ExecEvent::Exit { code },
            Err(e) => ExecEvent::Error {
                error: ErrorBody {
                    error: format!("waiting for the process: {e}"),
                    kind: ErrorKind::Internal,
                },
            },
        };
        let _ = out_tx.send(Message::Text(text(&last).into())).await;
    });
    let writer = tokio::spawn(async move {
        while let Some(msg) = out_rx.recv().await {
            if sink.send(msg).await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    // Whether the client is gone (the socket closed or broke), rather than done with stdin.
    let mut gone = true;
    while let Some(Ok(msg)) = stream.next().await {
        match msg {
            Message::Binary(bytes) => {
                if stdin.write_all(&bytes).await.is_err() {
                    gone = false;
                    break;
                }
                let _ = stdin.flush().await;
            }
            Message::Text(t) => match serde_json::from_str::<ExecControl>(&t) {
                Ok(ExecControl::Resize { rows, cols }) => {
                    if let Some(resize) = &resize {
                        let _ = resize(rows, cols);
                    }
                }
                Ok(ExecControl::CloseStdin) => {
                    gone = false;
                    break;
                }
                Err(e) => debug!(id, "exec: control message ignored: {e}"),
            },
            Message::Close(_) => break,
            _ => {}
        }
    }
    let _ = stdin.shutdown().await;
    drop(stdin);
    // A client gone, now or while the process runs on without stdin: nobody is left to
    // read its output or its exit. Aborting the ender drops `wait`, which ends the process.
    let mut ender = ender;
    let mut ended = false;
    if !gone {
        let closed = async {
            while let Some(Ok(msg)) = stream.next().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        };
        tokio::select! {
            _ = &mut ender => ended = true,
            () = closed => gone = true,
        }
    }
    if gone {
        ender.abort();
    }
    // A JoinHandle polled again after it finished panics.
    if !ended {
        let _ = ender.await;
    }
    let _ = writer.await;
}

/// The client's side: starts `request` in sandbox `id` on the agent at `base`
/// (`http://host:port`) and hands back the process as a local exec's.
pub(crate) async fn connect(
    node: &str,
    base: &str,
    bearer: &str,
    kind: BackendKind,
    id: &str,
    request: ExecRequest,
) -> Result<ExecProcess, AgentError> {
    use tungstenite::client::IntoClientRequest as _;
    let unreachable = |message: String| AgentError::Unreachable {
        node: node.to_string(),
        address: base.to_string(),
        message,
    };
    let url = format!(
        "{}/api/v1/agent/exec?sandbox={}&backend={}",
        base.replacen("http://", "ws://", 1),
        id,
        kind
    );
    let mut req = url
        .into_client_request()
        .map_err(|e| unreachable(e.to_string()))?;
    let auth = bearer
        .parse()
        .map_err(|_| AgentError::Invalid("the agent's token is not a valid header".into()))?;
    req.headers_mut()
        .insert(tungstenite::http::header::AUTHORIZATION, auth);
    let (mut socket, _) = match tokio_tungstenite::connect_async(req).await {
        Ok(ok) => ok,
        Err(tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp.into_body().unwrap_or_default();
            let (kind, message) = match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(b) => (b.kind, b.error),
                Err(_) => (
                    ErrorKind::from_http_status(status),
                    format!("HTTP {status}: {}", String::from_utf8_lossy(&body)),
                ),
            };
            return Err(AgentError::Remote {
                node: node.to_string(),
                kind,
                message,
            });
        }
        Err(e) => return Err(unreachable(e.to_string())),
    };
    let tty = request.tty.is_some();
    socket
        .send(tungstenite::Message::Text(
            text(&ExecStart::from(request)).into(),
        ))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    match socket.next().await {
        Some(Ok(tungstenite::Message::Text(t))) => match serde_json::from_str::<ExecEvent>(&t) {
            Ok(ExecEvent::Started) => {}
            Ok(ExecEvent::Error { error }) => {
                return Err(AgentError::Remote {
                    node: node.to_string(),
                    kind: error.kind,
                    message: error.error,
                });
            }
            _ => return Err(unreachable(format!("unexpected answer to exec: {t}"))),
        },
        other => {
            return Err(unreachable(format!(
                "the agent closed the exec before starting it: {other:?}"
            )));
        }
    }

    let (stdin_w, mut stdin_r) = tokio::io::duplex(64 * 1024);
    let (mut out_w, out_r) = tokio::io::duplex(64 * 1024);
    let (err_w, err_r) = tokio::io::duplex(64 * 1024);
    let (resize_tx, mut resize_rx) = mpsc::unbounded_channel::<(u16, u16)>();
    let (exit_tx, exit_rx) = oneshot::channel::<std::io::Result<i32>>();
    let mut err_w = Some(err_w);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        let mut stdin_open = true;
        let mut exit_tx = Some(exit_tx);
        let finish = |exit_tx: &mut Option<oneshot::Sender<_>>, r: std::io::Result<i32>| {
            if let Some(tx) = exit_tx.take() {
                let _ = tx.send(r);
            }
        };
        loop {
            tokio::select! {
                // The caller dropped `wait` (its client went away): closing the exec makes
                // the agent end the process.
                () = async {
                    match exit_tx.as_mut() {
                        Some(tx) => tx.closed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let _ = socket.close(None).await;
                    break;
                }
                msg = socket.next() => match msg {
                    Some(Ok(tungstenite::Message::Binary(b))) => {
                        let (tag, bytes) = match b.split_first() {
                            Some((t, rest)) => (*t, rest),
                            None => continue,
                        };
                        let written = if tag == STDERR {
                            match &mut err_w {
                                Some(w) => w.write_all(bytes).await,
                                None => Ok(()),
                            }
                        } else {
                            out_w.write_all(bytes).await
                        };
                        // A reader that went away gets nothing more; the process runs on.
                        let _ = written;
                    }
                    Some(Ok(tungstenite::Message::Text(t))) => {
                        match serde_json::from_str::<ExecEvent>(&t) {
                            Ok(ExecEvent::Exit { code }) => finish(&mut exit_tx, Ok(code)),
                            Ok(ExecEvent::Error { error }) => {
                                finish(&mut exit_tx, Err(std::io::Error::other(error.error)));
                            }
                            _ => {}
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        finish(&mut exit_tx, Err(std::io::Error::other(format!("exec stream: {e}"))));
                        break;
                    }
                    None => break,
                },
                n = stdin_r.read(&mut buf), if stdin_open => {
                    let msg = match n {
                        Ok(0) | Err(_) => {
                            stdin_open = false;
                            tungstenite::Message::Text(text(&ExecControl::CloseStdin).into())
                        }
                        Ok(n) => tungstenite::Message::Binary(buf[..n].to_vec().into()),
                    };
                    if socket.send(msg).await.is_err() {
                        stdin_open = false;
                    }
                }
                Some((rows, cols)) = resize_rx.recv() => {
                    let msg = text(&ExecControl::Resize { rows, cols });
                    let _ = socket.send(tungstenite::Message::Text(msg.into())).await;
                }
            }
        }
        finish(
            &mut exit_tx,
            Err(std::io::Error::other(
                "the agent closed the exec without its exit status",
            )),
        );
        // Dropping the writers ends the readers' streams.
        drop(err_w.take());
    });
    Ok(ExecProcess {
        stdin: Box::new(stdin_w),
        stdout: Box::new(out_r),
        stderr: if tty { None } else { Some(Box::new(err_r)) },
        resize: tty.then(|| {
            Box::new(move |rows, cols| {
                resize_tx
                    .send((rows, cols))
                    .map_err(|_| std::io::Error::other("the exec has ended"))
            }) as warren_runtime::Resize
        }),
        wait: Box::pin(async move {
            exit_rx
                .await
                .unwrap_or_else(|_| Err(std::io::Error::other("the exec task ended")))
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_as_documented() {
        let start: ExecStart = serde_json::from_str(
            r#"{"argv":["sh","-c","echo hi"],"env":[["A","1"]],"tty":[24,80]}"#,
        )
        .expect("exec start");
        assert_eq!(start.argv, ["sh", "-c", "echo hi"]);
        assert_eq!(start.env, [("A".to_string(), "1".to_string())]);
        assert_eq!(start.tty, Some((24, 80)));
        assert_eq!(
            serde_json::from_str::<ExecControl>(r#"{"type":"resize","rows":30,"cols":100}"#)
                .expect("resize"),
            ExecControl::Resize {
                rows: 30,
                cols: 100
            }
        );
        assert_eq!(
            text(&ExecEvent::Exit { code: 3 }),
            r#"{"type":"exit","code":3}"#
        );
        let refused = text(&ExecEvent::Error {
            error: ErrorBody {
                error: "sandbox x is not running".into(),
                kind: ErrorKind::NotFound,
            },
        });
        assert_eq!(
            refused,
            r#"{"type":"error","error":"sandbox x is not running","kind":"not_found"}"#
        );
        let err = serde_json::from_str::<ExecStart>(r#"{"argv":["x"],"tyy":[1,2]}"#)
            .expect_err("unknown field");
        assert!(err.to_string().contains("tyy"), "{err}");
    }
}
