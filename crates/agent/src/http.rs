//! The node agent's HTTP API (seed 004, port 5758 by default), served with axum over HTTP/1.1.
//!
//! Every route checks the bearer token first (401 without it). Bodies are read whole and
//! parsed with `serde_path_to_error`, so a 400 names the field that is wrong
//! (`spec.resources.limits: invalid type...`). Errors carry an [`ErrorKind`] and the HTTP
//! status it stands for. Logs stream as CRI log lines (the format of the files themselves),
//! following the sandbox until it ends when `follow=true`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use warren_runtime::logs::{self, LogRecord};

use crate::AgentError;
use crate::api::{ErrorBody, ErrorKind, LogsQuery};
use crate::node::NodeAgent;

#[derive(Debug, Clone)]
struct Shared {
    node: Arc<NodeAgent>,
    token: Arc<str>,
}

/// The API's routes over `node`, every one behind `token`.
pub fn router(node: Arc<NodeAgent>, token: &str) -> Router {
    let shared = Shared {
        node,
        token: Arc::from(token),
    };
    Router::new()
        .route("/api/v1/agent/create", post(create))
        .route("/api/v1/agent/adopt", post(adopt))
        .route("/api/v1/agent/delete", post(delete))
        .route("/api/v1/agent/stop", post(stop))
        .route("/api/v1/agent/update", post(update))
        .route("/api/v1/agent/signal", post(signal))
        .route("/api/v1/agent/pause", post(pause))
        .route("/api/v1/agent/resume", post(resume))
        .route("/api/v1/agent/status", get(status))
        .route("/api/v1/agent/processes", get(processes))
        .route("/api/v1/agent/logs", get(logs_route))
        .route("/api/v1/agent/exec", get(exec_route))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .layer(middleware::from_fn_with_state(shared.clone(), authorize))
        .with_state(shared)
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    node: Arc<NodeAgent>,
    token: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt as _;
    // A reply is one small write: without NODELAY it can wait for the peer's delayed ACK.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(node, token))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn authorize(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if constant_time_eq(t.as_bytes(), s.token.as_bytes()) => next.run(req).await,
        Some(_) => error(ErrorKind::Unauthorized, "the bearer token is wrong".into()),
        None => error(
            ErrorKind::Unauthorized,
            "this agent needs a bearer token (Authorization: Bearer TOKEN)".into(),
        ),
    }
}

/// Compares without an early exit, so the time taken does not tell how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(e) => error(ErrorKind::Internal, format!("encoding the reply: {e}")),
    }
}

fn error(kind: ErrorKind, message: String) -> Response {
    let status =
        StatusCode::from_u16(kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = ErrorBody {
        error: message,
        kind,
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        bytes,
    )
        .into_response()
}

fn agent_error(e: AgentError) -> Response {
    error(e.kind(), warren_runtime::error_chain(&e))
}

/// Parses a JSON body; the error names the field (`spec.name: invalid type: ...`).
#[allow(clippy::result_large_err)] // the error is the reply, returned at once
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, Response> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = if path == "." {
            format!("invalid request body: {inner}")
        } else {
            format!("invalid request body: {path}: {inner}")
        };
        error(ErrorKind::Invalid, msg)
    })
}

macro_rules! handler {
    ($name:ident, $req:ty, |$node:ident, $r:ident| $call:expr) => {
        async fn $name(State(s): State<Shared>, body: Bytes) -> Response {
            let $r: $req = match parse(&body) {
                Ok(r) => r,
                Err(resp) => return resp,
            };
            let $node = &s.node;
            match $call.await {
                Ok(reply) => json(StatusCode::OK, &reply),
                Err(e) => agent_error(e),
            }
        }
    };
}

handler!(create, crate::api::CreateRequest, |node, r| node.create(r));
handler!(adopt, crate::api::CreateRequest, |node, r| node.adopt(r));
handler!(delete, crate::api::DeleteRequest, |node, r| node.delete(&r));
handler!(stop, crate::api::DeleteRequest, |node, r| node.stop(&r));
handler!(update, crate::api::UpdateRequest, |node, r| async move {
    node.update(&r).await.map(|()| serde_json::json!({}))
});
handler!(signal, crate::api::SignalRequest, |node, r| async move {
    node.signal(&r).await.map(|()| serde_json::json!({}))
});
handler!(pause, crate::api::PauseRequest, |node, r| async move {
    node.pause(&r, true).await.map(|()| serde_json::json!({}))
});
handler!(resume, crate::api::PauseRequest, |node, r| async move {
    node.pause(&r, false).await.map(|()| serde_json::json!({}))
});

/// `key=value&...` into pairs; values are ids, numbers and booleans, so `+` and `%XX` are
/// decoded and anything else is taken as it is.
fn query_pairs(q: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                    match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                        Some(v) => {
                            out.push(v);
                            i += 2;
                        }
                        None => out.push(b'%'),
                    }
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

#[allow(clippy::result_large_err)] // the error is the reply, returned at once
fn logs_query(q: Option<&str>) -> Result<LogsQuery, Response> {
    let mut out = LogsQuery::default();
    for (k, v) in query_pairs(q.unwrap_or_default()) {
        let bad = |what: &str| {
            error(
                ErrorKind::Invalid,
                format!("query {k}: {v:?} is not {what}"),
            )
        };
        match k.as_str() {
            "sandbox" => out.sandbox = v,
            "follow" => {
                out.follow = match v.as_str() {
                    "" | "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(bad("true or false")),
                }
            }
            "tail" => out.tail = Some(v.parse().map_err(|_| bad("a count"))?),
            "sinceMs" | "since_ms" => {
                out.since_ms = Some(v.parse().map_err(|_| bad("unix milliseconds"))?)
            }
            _ => {}
        }
    }
    if out.sandbox.is_empty() {
        return Err(error(
            ErrorKind::Invalid,
            "query sandbox: missing (expected ?sandbox=ID)".into(),
        ));
    }
    Ok(out)
}

async fn status(State(s): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let one = query_pairs(q.as_deref().unwrap_or_default())
        .into_iter()
        .find(|(k, _)| k == "sandbox")
        .map(|(_, v)| v);
    match one {
        Some(id) => match s.node.sandbox(&id).await {
            Ok(state) => json(StatusCode::OK, &state),
            Err(e) => agent_error(e),
        },
        None => json(StatusCode::OK, &s.node.status().await),
    }
}

/// `GET /api/v1/agent/processes?sandbox=ID`: its processes (`warren top`).
async fn processes(State(s): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let one = query_pairs(q.as_deref().unwrap_or_default())
        .into_iter()
        .find(|(k, _)| k == "sandbox")
        .map(|(_, v)| v);
    let Some(id) = one else {
        return agent_error(AgentError::Invalid(
            "sandbox: missing (GET /api/v1/agent/processes?sandbox=ID)".into(),
        ));
    };
    match s.node.processes(&id).await {
        Ok(list) => json(StatusCode::OK, &list),
        Err(e) => agent_error(e),
    }
}

/// `warren exec` over a WebSocket ([`crate::exec`]); the sandbox is checked before the
/// upgrade, so an unknown one is a plain 404.
async fn exec_route(
    State(s): State<Shared>,
    RawQuery(q): RawQuery,
    upgrade: Result<
        axum::extract::ws::WebSocketUpgrade,
        axum::extract::ws::rejection::WebSocketUpgradeRejection,
    >,
) -> Response {
    let mut id = String::new();
    let mut backend = None;
    for (k, v) in query_pairs(q.as_deref().unwrap_or_default()) {
        match k.as_str() {
            "sandbox" => id = v,
            "backend" => match v.parse::<warren_spec::BackendKind>() {
                Ok(kind) => backend = Some(kind),
                Err(e) => return error(ErrorKind::Invalid, format!("query backend: {v:?}: {e}")),
            },
            _ => {}
        }
    }
    if id.is_empty() {
        return error(
            ErrorKind::Invalid,
            "query sandbox: missing (expected ?sandbox=ID)".into(),
        );
    }
    if !s.node.holds(&id) {
        return error(
            ErrorKind::NotFound,
            format!("sandbox {id} is not on agent {}", s.node.node()),
        );
    }
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(e) => {
            return error(
                ErrorKind::Invalid,
                format!("exec is a WebSocket: {}", e.body_text()),
            );
        }
    };
    let node = s.node.clone();
    upgrade.on_upgrade(move |socket| crate::exec::serve(node, id, backend, socket))
}

/// One record as a CRI log line, newline included (the file's own format).
pub fn cri_line(r: &LogRecord) -> Vec<u8> {
    let mut line = format!(
        "{} {} {} ",
        logs::format_timestamp(r.time),
        r.stream,
        if r.partial { 'P' } else { 'F' }
    )
    .into_bytes();
    line.extend_from_slice(&r.content);
    line.push(b'\n');
    line
}

async fn logs_route(State(s): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let query = match logs_query(q.as_deref()) {
        Ok(q) => q,
        Err(resp) => return resp,
    };
    let (kind, path) = match s.node.log_path(&query.sandbox) {
        Ok(found) => found,
        Err(e) => return agent_error(e),
    };
    let agent = s.node.agent().clone();
    let id = query.sandbox.clone();
    let ended = |st: &warren_runtime::BackendStatus| {
        !matches!(
            st,
            warren_runtime::BackendStatus::Running | warren_runtime::BackendStatus::Created
        )
    };
    let finished = agent.status(kind, &id).await.map_or(true, |st| ended(&st));
    if finished {
        agent.logs_settled(kind, &id).await;
    }
    let since = query
        .since_ms
        .map(|ms| UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0)));
    let (records, offset) = match logs::read_logs_from(&path, query.tail, since) {
        Ok(found) => found,
        Err(e) if e.is_not_found() => (Vec::new(), 0),
        Err(e) => return error(ErrorKind::Internal, warren_runtime::error_chain(&e)),
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    tokio::spawn(async move {
        for r in &records {
            if tx.send(Ok(Bytes::from(cri_line(r)))).await.is_err() {
                return;
            }
        }
        if !query.follow || finished {
            return;
        }
        let (done_tx, done_rx) = watch::channel(false);
        let watcher = {
            let (agent, id) = (agent.clone(), id.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    match agent.status(kind, &id).await {
                        Ok(st) if !ended(&st) => {}
                        _ => break,
                    }
                }
                agent.logs_settled(kind, &id).await;
                let _ = done_tx.send(true);
            })
        };
        let mut follower = logs::LogFollower::new(path, offset, done_rx);
        loop {
            match follower.next().await {
                Ok(Some(r)) if since.is_none_or(|s| r.time >= s) => {
                    if tx.send(Ok(Bytes::from(cri_line(&r)))).await.is_err() {
                        break;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    break;
                }
            }
        }
        watcher.abort();
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        Body::from_stream(stream),
    )
        .into_response()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode() {
        assert_eq!(
            query_pairs("sandbox=ab%2Dc&follow&tail=3+"),
            vec![
                ("sandbox".to_string(), "ab-c".to_string()),
                ("follow".to_string(), String::new()),
                ("tail".to_string(), "3 ".to_string()),
            ]
        );
        assert_eq!(query_pairs("x=%zz%4"), vec![("x".into(), "%zz%4".into())]);
        let q = logs_query(Some("sandbox=a&follow=true&tail=2&sinceMs=5")).unwrap();
        assert!(q.follow);
        assert_eq!((q.tail, q.since_ms), (Some(2), Some(5)));
        assert!(logs_query(Some("follow=1")).is_err());
        assert!(logs_query(Some("sandbox=a&tail=x")).is_err());
    }

    #[test]
    fn a_record_is_written_back_as_the_line_it_came_from() {
        let line = b"2016-10-06T00:17:09.669794202Z stdout P half";
        let r = logs::parse_line(line).unwrap();
        let mut expect = line.to_vec();
        expect.push(b'\n');
        assert_eq!(cri_line(&r), expect);
    }
}
