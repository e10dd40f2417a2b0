//! `Exec`: a process beside the workload, with pipes or a terminal, streamed both ways.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Response, Status, Streaming};

use crate::port::Fd;
use crate::process::{exit_code, spawn_error};
use crate::proto;
use crate::proto::exec_output::Output as Out;
use crate::service::{Guest, feed, forward};

pub fn run(
    guest: Arc<Guest>,
    start: proto::ExecStart,
    input: Streaming<proto::ExecInput>,
) -> Result<Response<crate::service::ExecStream>, Status> {
    let argv0 = start.argv.first().cloned().unwrap_or_default();
    let tty = start.tty_rows > 0 && start.tty_cols > 0;
    let program = guest.exec_launch(&start).program(tty)?;
    let (tx, rx) = mpsc::channel(32);
    let (pid, status, readers) = if tty {
        let size = nix::pty::Winsize {
            ws_row: start.tty_rows.min(u16::MAX.into()) as u16,
            ws_col: start.tty_cols.min(u16::MAX.into()) as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&size), None)
            .map_err(|e| Status::internal(format!("openpty: {}", e.desc())))?;
        let (pid, status) = guest
            .reaper
            .spawn(&program, [&pty.slave, &pty.slave, &pty.slave])
            .map_err(|e| spawn_error(&argv0, &e))?;
        // The slave must close here, or the master never sees the end.
        drop(pty.slave);
        let master = Fd::new(pty.master).map_err(|e| Status::internal(format!("terminal: {e}")))?;
        let out = tokio::spawn(forward(master.clone(), tx.clone(), Out::Stdout));
        tokio::spawn(feed(input, Some(Box::new(master.clone())), Some(master)));
        (pid, status, vec![out])
    } else {
        let (stdin, child_stdin) = crate::process::pipe(true)?;
        let (stdout, child_stdout) = crate::process::pipe(false)?;
        let (stderr, child_stderr) = crate::process::pipe(false)?;
        let (pid, status) = guest
            .reaper
            .spawn(&program, [&child_stdin, &child_stdout, &child_stderr])
            .map_err(|e| spawn_error(&argv0, &e))?;
        drop((child_stdin, child_stdout, child_stderr));
        let stdout = tokio::net::unix::pipe::Receiver::from_owned_fd(stdout)
            .map_err(|e| Status::internal(format!("stdout pipe: {e}")))?;
        let stderr = tokio::net::unix::pipe::Receiver::from_owned_fd(stderr)
            .map_err(|e| Status::internal(format!("stderr pipe: {e}")))?;
        let stdin = tokio::net::unix::pipe::Sender::from_owned_fd(stdin)
            .map_err(|e| Status::internal(format!("stdin pipe: {e}")))?;
        let out = tokio::spawn(forward(stdout, tx.clone(), Out::Stdout));
        let err = tokio::spawn(forward(stderr, tx.clone(), Out::Stderr));
        tokio::spawn(feed(input, Some(Box::new(stdin)), None));
        (pid, status, vec![out, err])
    };
    let started = proto::ExecOutput {
        output: Some(Out::Started(pid)),
    };
    let _ = tx.try_send(Ok(started));
    tokio::spawn(async move {
        let mut status = status;
        let ended = tokio::select! {
            ended = &mut status => ended,
            // The host hung up (its client went away): nobody is left to read the
            // process's output or its exit. Killed, and reaped by the reaper as usual.
            () = tx.closed() => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = status.await;
                return;
            }
        };
        let code = match ended {
            Ok(s) => exit_code(&s).0,
            Err(_) => 128 + libc::SIGKILL,
        };
        // Output written before the end is sent before the exit code (bounded: a background
        // process may hold the pipes open).
        for r in readers {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), r).await;
        }
        let _ = tx
            .send(Ok(proto::ExecOutput {
                output: Some(Out::ExitCode(code)),
            }))
            .await;
    });
    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
}
