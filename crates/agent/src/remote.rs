//! [`RemoteAgent`]: the control plane's client of a `warren agent` process's HTTP API.
//!
//! One HTTP/1.1 connection pool per agent (keep-alive, `TCP_NODELAY`): a create is one POST on
//! a warm connection. Every call has a deadline, so an agent that stops answering fails the
//! call with [`AgentError::Unreachable`] instead of holding it forever; the control plane's
//! heartbeat timeout decides separately whether the agent is lost.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use warren_runtime::logs::{self, LogRecord};
use warren_runtime::{BackendInfo, BackendStatus, SandboxConfig};
use warren_spec::{BackendKind, ResourceInfo};

use crate::AgentError;
use crate::api::{
    AgentStatus, CreateRequest, CreateResponse, DeleteRequest, ErrorBody, ErrorKind, PauseRequest,
    PolicyWire, SandboxState, SignalRequest, UpdateRequest,
};

/// Longest a create or stop may take on the agent (a stop waits out its grace period, a
/// linux create may pull nothing but still unpacks).
const SLOW_CALL: Duration = Duration::from_secs(120);
/// Longest anything else may take.
const QUICK_CALL: Duration = Duration::from_secs(10);

/// A node agent reached over HTTP.
#[derive(Debug, Clone)]
pub struct RemoteAgent {
    node: String,
    /// `http://host:port`.
    base: String,
    bearer: String,
    client: Client<HttpConnector, Full<Bytes>>,
    /// True while the control plane counts the agent lost (no heartbeat): calls under way
    /// end then, and new ones fail at once, rather than wait out their deadlines.
    lost: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

/// `host:port` or `http://host:port[/]` as a base URL; the port defaults to 5758.
pub fn base_url(address: &str) -> Result<String, String> {
    let hp = address
        .strip_prefix("http://")
        .unwrap_or(address)
        .trim_end_matches('/');
    if hp.is_empty()
        || hp.contains('/')
        || address.contains("://") && !address.starts_with("http://")
    {
        return Err(format!(
            "{address:?} is not an agent address (expected host:port or http://host:port)"
        ));
    }
    let has_port = match hp.rsplit_once(':') {
        // `[::1]` alone has colons but no port.
        Some((host, port)) => !host.ends_with(':') && !hp.ends_with(']') && !port.is_empty(),
        None => false,
    };
    if has_port {
        let port = hp.rsplit_once(':').map(|(_, p)| p).unwrap_or_default();
        if port.parse::<u16>().is_err() {
            return Err(format!("{address:?}: {port:?} is not a port"));
        }
        Ok(format!("http://{hp}"))
    } else {
        Ok(format!("http://{hp}:{}", crate::api::DEFAULT_PORT))
    }
}

impl RemoteAgent {
    pub fn new(node: &str, address: &str, token: &str) -> Result<Self, AgentError> {
        let base = base_url(address).map_err(AgentError::Invalid)?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(3)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Ok(RemoteAgent {
            node: node.to_string(),
            base,
            bearer: format!("Bearer {token}"),
            client,
            lost: std::sync::Arc::new(tokio::sync::watch::Sender::new(false)),
        })
    }

    /// Marks the agent lost (its heartbeats stopped) or back: while lost, every call fails
    /// with [`AgentError::Unreachable`] at once, those under way too.
    pub fn set_lost(&self, lost: bool) {
        self.lost.send_replace(lost);
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn unreachable(&self, message: impl std::fmt::Display) -> AgentError {
        AgentError::Unreachable {
            node: self.node.clone(),
            address: self.base.clone(),
            message: message.to_string(),
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        deadline: Duration,
    ) -> Result<hyper::Response<hyper::body::Incoming>, AgentError> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(hyper::header::AUTHORIZATION, &self.bearer);
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| self.unreachable(e))?;
        let mut lost = self.lost.subscribe();
        let request = tokio::time::timeout(deadline, self.client.request(req));
        let resp = tokio::select! {
            resp = request => resp,
            _ = lost.wait_for(|lost| *lost) => {
                return Err(self.unreachable(
                    "the agent is lost (its heartbeats stopped); the call was given up",
                ));
            }
        };
        let resp = resp
            .map_err(|_| self.unreachable(format!("no answer within {deadline:?}")))?
            .map_err(|e| self.unreachable(warren_runtime::error_chain(&e)))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let bytes = tokio::time::timeout(deadline, resp.into_body().collect())
            .await
            .map_err(|_| self.unreachable("the error reply did not arrive"))?
            .map_err(|e| self.unreachable(e))?
            .to_bytes();
        let (kind, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => (b.kind, b.error),
            Err(_) => (
                ErrorKind::from_http_status(status),
                format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)),
            ),
        };
        Err(AgentError::Remote {
            node: self.node.clone(),
            kind,
            message,
        })
    }

    async fn call<R: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
        deadline: Duration,
    ) -> Result<R, AgentError> {
        let body = match body {
            Some(b) => Some(serde_json::to_vec(b).map_err(|e| self.unreachable(e))?),
            None => None,
        };
        let resp = self.send(method, path, body, deadline).await?;
        let bytes = tokio::time::timeout(deadline, resp.into_body().collect())
            .await
            .map_err(|_| self.unreachable("the reply did not arrive in time"))?
            .map_err(|e| self.unreachable(e))?
            .to_bytes();
        serde_json::from_slice(&bytes)
            .map_err(|e| self.unreachable(format!("unreadable reply: {e}")))
    }

    fn create_request(config: &SandboxConfig) -> CreateRequest {
        CreateRequest {
            id: config.id.clone(),
            spec: config.spec.clone(),
            resources: config.resources.clone(),
            policy: config.policy.as_ref().map(|p| PolicyWire {
                name: p.policy.name().to_string(),
                spec: p.policy.spec().clone(),
                decision: p.decision.clone(),
            }),
            stdin: config
                .stdin
                .as_ref()
                .map(|s| base64::engine::general_purpose::STANDARD.encode(s.bytes())),
        }
    }

    /// Creates and starts a sandbox on the agent.
    pub async fn run(&self, config: &SandboxConfig) -> Result<BackendInfo, AgentError> {
        let reply: CreateResponse = self
            .call(
                "POST",
                "/api/v1/agent/create",
                Some(&Self::create_request(config)),
                SLOW_CALL,
            )
            .await?;
        Ok(reply.info)
    }

    /// Hands a sandbox the control plane knows back to the agent; its status there.
    pub async fn adopt(
        &self,
        config: &SandboxConfig,
    ) -> Result<(BackendStatus, BackendInfo), AgentError> {
        let reply: CreateResponse = self
            .call(
                "POST",
                "/api/v1/agent/adopt",
                Some(&Self::create_request(config)),
                SLOW_CALL,
            )
            .await?;
        Ok((reply.status.into(), reply.info))
    }

    pub async fn stop(
        &self,
        kind: BackendKind,
        id: &str,
        grace: Duration,
    ) -> Result<BackendStatus, AgentError> {
        let req = DeleteRequest {
            id: id.to_string(),
            backend: Some(kind),
            grace_period_seconds: Some(grace.as_secs_f64()),
        };
        let reply: SandboxState = self
            .call("POST", "/api/v1/agent/stop", Some(&req), SLOW_CALL + grace)
            .await?;
        Ok(reply.status.into())
    }

    /// Removes a sandbox (stopping it at once if it still runs).
    pub async fn delete(&self, kind: BackendKind, id: &str) -> Result<(), AgentError> {
        let req = DeleteRequest {
            id: id.to_string(),
            backend: Some(kind),
            grace_period_seconds: Some(0.0),
        };
        let _: SandboxState = self
            .call("POST", "/api/v1/agent/delete", Some(&req), SLOW_CALL)
            .await?;
        Ok(())
    }

    pub async fn status(&self, _kind: BackendKind, id: &str) -> Result<BackendStatus, AgentError> {
        Ok(self.sandbox(id).await?.status.into())
    }

    /// What the sandbox uses now, as the agent's backend measures it.
    pub async fn usage(
        &self,
        _kind: BackendKind,
        id: &str,
    ) -> Result<Option<warren_runtime::Usage>, AgentError> {
        Ok(self.sandbox(id).await?.usage)
    }

    /// The sandbox's processes, as the agent's backend lists them (`warren top`).
    pub async fn processes(
        &self,
        _kind: BackendKind,
        id: &str,
    ) -> Result<Vec<warren_runtime::ProcessInfo>, AgentError> {
        check_id(id)?;
        self.call(
            "GET",
            &format!("/api/v1/agent/processes?sandbox={id}"),
            None::<&()>,
            QUICK_CALL,
        )
        .await
    }

    async fn sandbox(&self, id: &str) -> Result<SandboxState, AgentError> {
        check_id(id)?;
        self.call(
            "GET",
            &format!("/api/v1/agent/status?sandbox={id}"),
            None::<&()>,
            QUICK_CALL,
        )
        .await
    }

    pub async fn update(
        &self,
        kind: BackendKind,
        id: &str,
        resources: &ResourceInfo,
    ) -> Result<(), AgentError> {
        let req = UpdateRequest {
            id: id.to_string(),
            backend: Some(kind),
            resources: resources.clone(),
        };
        let _: serde_json::Value = self
            .call("POST", "/api/v1/agent/update", Some(&req), QUICK_CALL)
            .await?;
        Ok(())
    }

    /// Starts a process in the sandbox over a WebSocket ([`crate::exec`]).
    pub async fn exec(
        &self,
        kind: BackendKind,
        id: &str,
        request: warren_runtime::ExecRequest,
    ) -> Result<warren_runtime::ExecProcess, AgentError> {
        crate::exec::connect(&self.node, &self.base, &self.bearer, kind, id, request).await
    }

    pub async fn signal(&self, kind: BackendKind, id: &str, signal: i32) -> Result<(), AgentError> {
        let req = SignalRequest {
            id: id.to_string(),
            backend: Some(kind),
            signal,
        };
        let _: serde_json::Value = self
            .call("POST", "/api/v1/agent/signal", Some(&req), QUICK_CALL)
            .await?;
        Ok(())
    }

    /// Pauses (`pause`) or resumes the sandbox.
    pub async fn pause(&self, kind: BackendKind, id: &str, pause: bool) -> Result<(), AgentError> {
        let req = PauseRequest {
            id: id.to_string(),
            backend: Some(kind),
        };
        let path = if pause {
            "/api/v1/agent/pause"
        } else {
            "/api/v1/agent/resume"
        };
        let _: serde_json::Value = self.call("POST", path, Some(&req), QUICK_CALL).await?;
        Ok(())
    }

    /// Everything the agent holds and has.
    pub async fn agent_status(&self) -> Result<AgentStatus, AgentError> {
        self.call("GET", "/api/v1/agent/status", None::<&()>, QUICK_CALL)
            .await
    }

    /// The sandbox's log records: what exists now (the last `tail`, from `since_ms`), then,
    /// with `follow`, what it writes until it ends. Records arrive on the receiver; an error
    /// ends the stream.
    pub async fn logs(
        &self,
        id: &str,
        follow: bool,
        tail: Option<usize>,
        since_ms: Option<i64>,
    ) -> Result<mpsc::Receiver<Result<LogRecord, AgentError>>, AgentError> {
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(AgentError::Invalid(format!(
                "id: {id:?} is not a sandbox id"
            )));
        }
        let mut path = format!("/api/v1/agent/logs?sandbox={id}&follow={follow}");
        if let Some(t) = tail {
            path.push_str(&format!("&tail={t}"));
        }
        if let Some(s) = since_ms {
            path.push_str(&format!("&sinceMs={s}"));
        }
        let resp = self.send("GET", &path, None, QUICK_CALL).await?;
        let (tx, rx) = mpsc::channel(256);
        let this = self.clone();
        tokio::spawn(async move {
            let mut body = resp.into_body();
            let mut buf: Vec<u8> = Vec::new();
            loop {
                let frame = match body.frame().await {
                    None => return,
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => {
                        let _ = tx.send(Err(this.unreachable(e))).await;
                        return;
                    }
                };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
                    continue;
                };
                for line in buf[..end].split(|&b| b == b'\n') {
                    if let Ok(r) = logs::parse_line(line)
                        && tx.send(Ok(r)).await.is_err()
                    {
                        return;
                    }
                }
                buf.drain(..=end);
            }
        });
        Ok(rx)
    }
}

/// A sandbox id as it may go into a query string.
fn check_id(id: &str) -> Result<(), AgentError> {
    if id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        Err(AgentError::Invalid(format!(
            "id: {id:?} is not a sandbox id"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_get_the_default_port() {
        assert_eq!(base_url("10.0.0.2").as_deref(), Ok("http://10.0.0.2:5758"));
        assert_eq!(
            base_url("http://10.0.0.2:99/").as_deref(),
            Ok("http://10.0.0.2:99")
        );
        assert_eq!(base_url("[::1]").as_deref(), Ok("http://[::1]:5758"));
        assert_eq!(base_url("[::1]:7").as_deref(), Ok("http://[::1]:7"));
        for bad in ["", "https://x:1", "h:port", "a/b"] {
            assert!(base_url(bad).is_err(), "{bad}");
        }
    }
}
