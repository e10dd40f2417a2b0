//! The shim's calls to the warren server that outlive one Task call: waiting for a sandbox's
//! end, copying its output to containerd's FIFOs, removing it.

use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use warren_proto::v1;

use crate::task::{CALL_TIMEOUT, TtrpcResult, err, from_grpc, signal_status};
use containerd_shim::protos::ttrpc::Code;

/// How long a write to containerd's output FIFO may wait for a reader.
const STALLED_READER: Duration = Duration::from_secs(10);

/// Waits for warren sandbox `name` to end: its exit code, or 137 when it was removed.
/// `None` when warren cannot be asked.
pub async fn wait_exit(client: &mut warren_control::client::Client, name: &str) -> Option<u32> {
    let reply = client
        .wait_sandbox(v1::WaitSandboxRequest {
            name: name.to_string(),
            timeout_ms: None,
        })
        .await;
    match reply {
        Ok(sb) => Some(
            sb.into_inner()
                .status
                .and_then(|s| s.exit_code)
                .and_then(|c| u32::try_from(c).ok())
                .unwrap_or(signal_status(9)),
        ),
        Err(s) if s.code() == tonic::Code::NotFound => Some(signal_status(9)),
        Err(s) => {
            log::warn!("watching sandbox {name} in warren: {}", s.message());
            None
        }
    }
}

/// Follows the sandbox's log to its end, writing each stream's lines to its FIFO. The
/// bytes are the workload's own; they go to containerd's client untouched.
pub async fn copy_logs(
    client: &mut warren_control::client::Client,
    name: &str,
    mut out: Option<tokio::fs::File>,
    mut err: Option<tokio::fs::File>,
) -> Result<(), String> {
    let mut stream = client
        .stream_logs(v1::StreamLogsRequest {
            name: name.to_string(),
            follow: true,
            ..Default::default()
        })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    while let Some(entry) = stream
        .message()
        .await
        .map_err(|s| s.message().to_string())?
    {
        let slot = if entry.stream == v1::log_entry::Stream::Stderr as i32 {
            &mut err
        } else {
            &mut out
        };
        let Some(file) = slot.as_mut() else { continue };
        let mut bytes = entry.content;
        if !entry.partial {
            bytes.push(b'\n');
        }
        // The shim holds a read end of each FIFO too (so containerd's client sees end-of-file
        // at exit, not before): with nobody reading, a full pipe would block forever. A
        // stream nobody drains is dropped; warren's log keeps everything, and the task
        // still ends with its exit code.
        match tokio::time::timeout(STALLED_READER, file.write_all(&bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                log::warn!("task {name}: output copy stopped: {e}");
                *slot = None;
            }
            Err(_) => {
                log::warn!(
                    "task {name}: nobody reads its output for {STALLED_READER:?}; see `warren logs {name}`"
                );
                *slot = None;
            }
        }
    }
    for f in [out.as_mut(), err.as_mut()].into_iter().flatten() {
        let _ = f.flush().await;
    }
    Ok(())
}

/// Removes task `name`'s sandbox after its shim died, if it is the task's: one labelled
/// with another containerd namespace (warren's names are global, containerd's ids are per
/// namespace) belongs to another task and is left. The delete names the id that was looked
/// at, so a sandbox created under the name meanwhile is left too. Returns whether it was
/// removed.
pub async fn remove_sandbox_of(
    client: &mut warren_control::client::Client,
    name: &str,
    namespace: &str,
) -> TtrpcResult<bool> {
    let call = client.get_sandbox(v1::GetSandboxRequest {
        name: name.to_string(),
    });
    let sandbox = match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(sb)) => sb.into_inner(),
        Ok(Err(s)) if s.code() == tonic::Code::NotFound => return Ok(false),
        Ok(Err(s)) => return Err(from_grpc(&format!("get sandbox {name:?}"), &s)),
        Err(_) => {
            return Err(err(
                Code::DEADLINE_EXCEEDED,
                format!("warren server: get sandbox {name:?}: no answer within {CALL_TIMEOUT:?}"),
            ));
        }
    };
    let owner = sandbox
        .spec
        .as_ref()
        .and_then(|s| s.labels.get(crate::bundle::LABEL_NAMESPACE));
    if owner.map(String::as_str) != Some(namespace) {
        return Err(err(
            Code::FAILED_PRECONDITION,
            format!(
                "sandbox {name:?} is not this task's: it belongs to containerd namespace {:?}, not {namespace:?}",
                owner.map(String::as_str).unwrap_or("")
            ),
        ));
    }
    delete(client, name, Some(&sandbox.id)).await
}

/// Deletes the sandbox in warren; one already gone is fine.
pub async fn remove_sandbox(
    client: &mut warren_control::client::Client,
    name: &str,
) -> TtrpcResult<()> {
    delete(client, name, None).await.map(|_| ())
}

/// Deletes sandbox `name` (only if its id is `id`, when given); whether it did: false when it
/// was gone, or is another sandbox now.
async fn delete(
    client: &mut warren_control::client::Client,
    name: &str,
    id: Option<&str>,
) -> TtrpcResult<bool> {
    let call = client.delete_sandbox(v1::DeleteSandboxRequest {
        name: name.to_string(),
        grace_period_seconds: Some(0),
        id: id.map(str::to_string),
    });
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(_)) => Ok(true),
        Ok(Err(s)) if s.code() == tonic::Code::NotFound => Ok(false),
        // FAILED_PRECONDITION also means an agent that cannot act: only a name that now
        // holds another sandbox is "not ours".
        Ok(Err(s)) if id.is_some() && s.code() == tonic::Code::FailedPrecondition => {
            let now = client.get_sandbox(v1::GetSandboxRequest {
                name: name.to_string(),
            });
            match tokio::time::timeout(CALL_TIMEOUT, now).await {
                Ok(Ok(sb)) if Some(sb.get_ref().id.as_str()) != id => Ok(false),
                Ok(Err(gone)) if gone.code() == tonic::Code::NotFound => Ok(false),
                _ => Err(from_grpc(&format!("delete sandbox {name:?}"), &s)),
            }
        }
        Ok(Err(s)) => Err(from_grpc(&format!("delete sandbox {name:?}"), &s)),
        Err(_) => Err(err(
            Code::DEADLINE_EXCEEDED,
            format!("warren server: delete sandbox {name:?}: no answer within {CALL_TIMEOUT:?}"),
        )),
    }
}
