//! A QMP client: qemu's machine protocol, JSON objects one per line over a unix socket.
//!
//! One connection per use: connect, read the greeting, `qmp_capabilities`, then commands.
//! Asynchronous events qemu interleaves (`{"event": ...}`) are skipped while waiting for a
//! command's `return` or `error`. Every read is bounded in time and size: qemu is trusted
//! more than the guest, but a wedged qemu must not wedge the server.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;

/// Longest line accepted from qemu.
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("qmp {path}: {action}")]
    Io {
        path: String,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("qmp {path}: no answer to {command} within {timeout:?}")]
    Timeout {
        path: String,
        command: String,
        timeout: Duration,
    },
    #[error("qmp {path}: {command}: {class}: {desc}")]
    Command {
        path: String,
        command: String,
        class: String,
        desc: String,
    },
    #[error("qmp {path}: {message}")]
    Protocol { path: String, message: String },
}

#[derive(Debug)]
pub struct Qmp {
    path: String,
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    timeout: Duration,
}

impl Qmp {
    /// Connects and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let display = path.display().to_string();
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout {
                path: display.clone(),
                command: "connect".into(),
                timeout,
            })?
            .map_err(|source| QmpError::Io {
                path: display.clone(),
                action: "connect",
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            path: display,
            reader: BufReader::new(r),
            writer: w,
            timeout,
        };
        let greeting = qmp.read_value("greeting").await?;
        if greeting.get("QMP").is_none() {
            return Err(qmp.protocol(format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    fn protocol(&self, message: String) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            message,
        }
    }

    async fn read_value(&mut self, command: &str) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        let read = async {
            loop {
                line.clear();
                let n = tokio::io::AsyncReadExt::take(&mut self.reader, MAX_LINE as u64)
                    .read_until(b'\n', &mut line)
                    .await?;
                if n == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                }
                if line.trim_ascii().is_empty() {
                    continue;
                }
                return Ok(());
            }
        };
        tokio::time::timeout(self.timeout, read)
            .await
            .map_err(|_| QmpError::Timeout {
                path: self.path.clone(),
                command: command.to_string(),
                timeout: self.timeout,
            })?
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                action: "read",
                source,
            })?;
        serde_json::from_slice(&line).map_err(|e| self.protocol(format!("not JSON ({e})")))
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let mut request = json!({ "execute": command });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let mut bytes = serde_json::to_vec(&request).map_err(|e| self.protocol(e.to_string()))?;
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .await
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                action: "write",
                source,
            })?;
        loop {
            let value = self.read_value(command).await?;
            if value.get("event").is_some() {
                continue;
            }
            if let Some(ret) = value.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = value.get("error") {
                return Err(QmpError::Command {
                    path: self.path.clone(),
                    command: command.to_string(),
                    class: err["class"].as_str().unwrap_or("Error").to_string(),
                    desc: err["desc"].as_str().unwrap_or("").to_string(),
                });
            }
            return Err(self.protocol(format!("unexpected reply to {command}: {value}")));
        }
    }

    /// Polls `query-migrate` until the migration (a snapshot save or restore) completed.
    pub async fn wait_migration(&mut self, patience: Duration) -> Result<(), QmpError> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let status = self.execute("query-migrate", None).await?;
            match status["status"].as_str() {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    return Err(self.protocol(format!(
                        "migration {}: {}",
                        status["status"],
                        status["error-desc"].as_str().unwrap_or("no reason given")
                    )));
                }
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(QmpError::Timeout {
                        path: self.path.clone(),
                        command: "query-migrate".into(),
                        timeout: patience,
                    });
                }
                _ => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake qemu: greeting, then answers each command from a script, with an event first.
    async fn fake(path: std::path::PathBuf, replies: Vec<&'static str>) {
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let (stream, _) = listener.accept().await.expect("accept");
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .expect("greet");
        for reply in replies {
            if lines.next_line().await.expect("read").is_none() {
                return;
            }
            w.write_all(b"{\"event\": \"RESUME\", \"timestamp\": {}}\n")
                .await
                .expect("event");
            w.write_all(reply.as_bytes()).await.expect("reply");
            w.write_all(b"\n").await.expect("nl");
        }
    }

    #[tokio::test]
    async fn commands_events_and_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let server = tokio::spawn(fake(
            path.clone(),
            vec![
                r#"{"return": {}}"#,
                r#"{"return": {"status": "running", "running": true}}"#,
                r#"{"error": {"class": "GenericError", "desc": "no such thing"}}"#,
                r#"{"return": {"status": "active"}}"#,
                r#"{"return": {"status": "completed"}}"#,
            ],
        ));
        while !path.exists() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("connect");
        let status = qmp.execute("query-status", None).await.expect("status");
        assert_eq!(status["status"], "running");
        let err = qmp
            .execute("frobnicate", Some(json!({"x": 1})))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("frobnicate: GenericError: no such thing"),
            "{err}"
        );
        qmp.wait_migration(Duration::from_secs(5))
            .await
            .expect("migrated");
        server.await.expect("server");
    }

    #[tokio::test]
    async fn a_silent_qemu_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let _listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let err = Qmp::connect(&path, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err}");
    }
}
