//! `exec` into a VM sandbox: the guest's `Exec` stream as an [`ExecProcess`].
//!
//! The caller gets plain async pipes: stdin is read and sent as `stdin` messages (its end
//! as `close_stdin`), the guest's `stdout`/`stderr` messages are written into in-memory
//! pipes the caller reads, and the exit code resolves `wait`.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use warren_guest::proto;
use warren_guest::proto::exec_input::Input;
use warren_guest::proto::exec_output::Output;
use warren_runtime::{BackendError, ExecProcess, ExecRequest};
use warren_spec::parse_user;

use crate::backend::{Running, guest_error};

const PIPE: usize = 64 << 10;

pub(crate) async fn exec(
    running: Running,
    request: ExecRequest,
) -> Result<ExecProcess, BackendError> {
    let state = &running.state;
    let mut env = state.env.clone();
    for (k, v) in &request.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(BackendError::Invalid(format!(
                "exec env: {k:?} is not a variable name"
            )));
        }
        env.retain(|e| e.split_once('=').map_or(e.as_str(), |(key, _)| key) != k);
        env.push(format!("{k}={v}"));
    }
    let (uid, gid) = match &request.user {
        Some(u) => parse_user(u).map_err(|e| BackendError::Invalid(format!("exec user: {e}")))?,
        None => (state.uid, state.gid),
    };
    let (rows, cols) = request
        .tty
        .map_or((0, 0), |(r, c)| (u32::from(r), u32::from(c)));
    let start = proto::ExecStart {
        argv: request.argv.clone(),
        env,
        cwd: request.cwd.clone().unwrap_or_else(|| state.cwd.clone()),
        uid,
        gid,
        tty_rows: rows,
        tty_cols: cols,
    };
    let (input_tx, input_rx) = mpsc::channel::<proto::ExecInput>(16);
    input_tx
        .send(proto::ExecInput {
            input: Some(Input::Start(start)),
        })
        .await
        .map_err(|_| BackendError::Other("exec: input closed".into()))?;
    let mut client = running.client.clone();
    let mut replies = tokio::time::timeout(
        Duration::from_secs(10),
        client.exec(ReceiverStream::new(input_rx)),
    )
    .await
    .map_err(|_| BackendError::Other("exec: the guest did not answer".into()))?
    .map_err(|s| guest_error("exec", s))?
    .into_inner();
    // The guest says `started` first, or refuses (a missing program).
    match replies.next().await {
        Some(Ok(proto::ExecOutput {
            output: Some(Output::Started(_)),
        })) => {}
        Some(Err(s)) => return Err(guest_error("exec", s)),
        other => {
            return Err(BackendError::Other(format!(
                "exec: unexpected first reply from the guest: {other:?}"
            )));
        }
    }
    let (stdin_ours, mut stdin_theirs) = tokio::io::duplex(PIPE);
    let feed = input_tx.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 << 10];
        loop {
            match stdin_theirs.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = feed
                        .send(proto::ExecInput {
                            input: Some(Input::CloseStdin(true)),
                        })
                        .await;
                    return;
                }
                Ok(n) => {
                    let msg = proto::ExecInput {
                        input: Some(Input::Stdin(buf[..n].to_vec())),
                    };
                    if feed.send(msg).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let (mut out_w, out_r) = tokio::io::duplex(PIPE);
    let (mut err_w, err_r) = tokio::io::duplex(PIPE);
    let (exit_tx, exit_rx) = oneshot::channel::<std::io::Result<i32>>();
    // Keeps the input stream open while the process runs (the guest stops reading input
    // when it ends, and resizes still need a way in).
    let keep_input = input_tx.clone();
    let mut exit_tx = exit_tx;
    tokio::spawn(async move {
        let _keep = keep_input;
        let result = loop {
            let reply = tokio::select! {
                reply = replies.next() => reply,
                // The caller dropped `wait` (its client went away): dropping the call
                // makes the guest end the process.
                () = exit_tx.closed() => return,
            };
            match reply {
                Some(Ok(proto::ExecOutput { output: Some(out) })) => match out {
                    Output::Stdout(b) => {
                        let _ = out_w.write_all(&b).await;
                    }
                    Output::Stderr(b) => {
                        let _ = err_w.write_all(&b).await;
                    }
                    Output::ExitCode(code) => break Ok(code),
                    Output::Started(_) => {}
                },
                Some(Ok(_)) => {}
                Some(Err(s)) => break Err(std::io::Error::other(format!("exec: {}", s.message()))),
                None => {
                    break Err(std::io::Error::other(
                        "exec: the guest ended the stream without an exit code",
                    ));
                }
            }
        };
        drop((out_w, err_w));
        let _ = exit_tx.send(result);
    });
    let tty = request.tty.is_some();
    let resize: Option<warren_runtime::Resize> = tty.then(|| {
        let tx = input_tx.clone();
        Box::new(move |rows: u16, cols: u16| {
            tx.try_send(proto::ExecInput {
                input: Some(Input::Resize(proto::Resize {
                    rows: rows.into(),
                    cols: cols.into(),
                })),
            })
            .map_err(|_| std::io::Error::other("exec: the process ended"))
        }) as warren_runtime::Resize
    });
    drop(input_tx);
    Ok(ExecProcess {
        stdin: Box::new(stdin_ours),
        stdout: Box::new(out_r),
        stderr: if tty { None } else { Some(Box::new(err_r)) },
        resize,
        wait: Box::pin(async move {
            exit_rx
                .await
                .unwrap_or_else(|_| Err(std::io::Error::other("exec: lost the guest")))
        }),
    })
}
