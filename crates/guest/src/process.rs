//! Processes in the guest: starting them (chroot, cgroup, user), reaping every child (PID 1
//! inherits every orphan) and keeping the workload's output for the host.

use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use tokio::sync::{oneshot, watch};

use crate::proto;

/// Reaps every child of PID 1 and hands each exit status to whoever started that process.
/// Spawning holds the same lock, so a child that ends at once is never reaped before its
/// waiter is registered.
#[derive(Debug, Default)]
pub struct Reaper {
    waiting: Mutex<HashMap<i32, oneshot::Sender<WaitStatus>>>,
}

impl Reaper {
    fn lock(&self) -> MutexGuard<'_, HashMap<i32, oneshot::Sender<WaitStatus>>> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts `program` with `stdio` as its standard input, output and error; the receiver
    /// gets its wait status.
    pub fn spawn(
        &self,
        program: &crate::sys::Program,
        stdio: [&OwnedFd; 3],
    ) -> std::io::Result<(u32, oneshot::Receiver<WaitStatus>)> {
        // The child's descriptors 0-2 are made by dup2 from these: none may be 0-2 itself.
        let mut above = Vec::new();
        let mut raw = [0; 3];
        for (i, fd) in stdio.into_iter().enumerate() {
            raw[i] = if fd.as_raw_fd() > 2 {
                fd.as_raw_fd()
            } else {
                // try_clone duplicates to 3 or above.
                let copy = fd.try_clone()?;
                let r = copy.as_raw_fd();
                above.push(copy);
                r
            };
        }
        let mut waiting = self.lock();
        let pid = crate::sys::spawn(program, raw)?;
        drop(above);
        let (tx, rx) = oneshot::channel();
        waiting.insert(pid, tx);
        Ok((pid as u32, rx))
    }

    /// Reaps on every SIGCHLD, forever.
    pub async fn run(self: Arc<Self>) {
        let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
        {
            Ok(s) => s,
            Err(e) => {
                eprintln!("warren-guest: cannot watch SIGCHLD: {e}");
                return;
            }
        };
        loop {
            self.reap();
            if sigchld.recv().await.is_none() {
                return;
            }
        }
    }

    fn reap(&self) {
        let mut waiting = self.lock();
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => {
                    if let Some(tx) = status.pid().and_then(|p| waiting.remove(&p.as_raw())) {
                        let _ = tx.send(status);
                    }
                }
            }
        }
    }
}

/// A wait status as an exit code and signal: 128 + signal when killed.
pub fn exit_code(status: &WaitStatus) -> (i32, i32) {
    match status {
        WaitStatus::Exited(_, code) => (*code, 0),
        WaitStatus::Signaled(_, sig, _) => (128 + *sig as i32, *sig as i32),
        _ => (128 + libc::SIGKILL, libc::SIGKILL),
    }
}

/// How to start a process: argv, env, directory, user, root, cgroup.
#[derive(Debug, Clone)]
pub struct Launch {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub root: Option<String>,
    pub cgroup_procs: Option<String>,
}

fn cstring(field: &str, value: &str) -> Result<CString, tonic::Status> {
    CString::new(value)
        .map_err(|_| tonic::Status::invalid_argument(format!("{field}: {value:?} contains NUL")))
}

impl Launch {
    /// The program and its steps before exec, checked and ready to spawn.
    pub fn program(&self, tty: bool) -> Result<crate::sys::Program, tonic::Status> {
        let program = self
            .argv
            .first()
            .ok_or_else(|| tonic::Status::invalid_argument("argv: empty"))?;
        let argv = self
            .argv
            .iter()
            .enumerate()
            .map(|(i, a)| cstring(&format!("argv[{i}]"), a))
            .collect::<Result<Vec<_>, _>>()?;
        let mut envp = Vec::with_capacity(self.env.len());
        let mut path = None;
        for (i, entry) in self.env.iter().enumerate() {
            match entry.split_once('=') {
                Some((k, v)) if !k.is_empty() => {
                    // The last of a repeated key wins, as with std's Command.
                    envp.retain(|e: &CString| {
                        e.to_bytes().split(|b| *b == b'=').next() != Some(k.as_bytes())
                    });
                    envp.push(cstring(&format!("env[{i}]"), entry)?);
                    if k == "PATH" {
                        path = Some(v);
                    }
                }
                _ => {
                    return Err(tonic::Status::invalid_argument(format!(
                        "env[{i}]: {entry:?} is not KEY=VALUE"
                    )));
                }
            }
        }
        let paths = if program.contains('/') {
            vec![cstring("argv[0]", program)?]
        } else {
            path.unwrap_or(DEFAULT_PATH)
                .split(':')
                .map(|dir| {
                    // An empty entry is the current directory, as for execvp.
                    let dir = if dir.is_empty() { "." } else { dir };
                    cstring(
                        "env PATH",
                        &format!("{}/{program}", dir.trim_end_matches('/')),
                    )
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let cwd = if self.cwd.is_empty() { "/" } else { &self.cwd };
        Ok(crate::sys::Program {
            paths,
            argv,
            envp,
            enter: crate::sys::Enter {
                cgroup_procs: self
                    .cgroup_procs
                    .as_deref()
                    .map(|p| cstring("cgroup", p))
                    .transpose()?,
                root: self
                    .root
                    .as_deref()
                    .map(|r| cstring("root", r))
                    .transpose()?,
                cwd: cstring("cwd", cwd)?,
                uid: self.uid,
                gid: self.gid,
                tty,
            },
        })
    }
}

/// Where a program without a `/` is looked for when its env has no `PATH`.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A pipe: the parent's end and the child's.
pub fn pipe(child_reads: bool) -> Result<(OwnedFd, OwnedFd), tonic::Status> {
    let (r, w) = std::io::pipe().map_err(|e| tonic::Status::internal(format!("pipe: {e}")))?;
    let (r, w) = (OwnedFd::from(r), OwnedFd::from(w));
    Ok(if child_reads { (w, r) } else { (r, w) })
}

/// `/dev/null`, for a standard input with nothing in it.
pub fn null() -> Result<OwnedFd, tonic::Status> {
    std::fs::File::open("/dev/null")
        .map(OwnedFd::from)
        .map_err(|e| tonic::Status::internal(format!("open /dev/null: {e}")))
}

/// A start error as the host sees it: a missing program or directory is the caller's input.
pub fn spawn_error(argv0: &str, e: &std::io::Error) -> tonic::Status {
    if let Some(workdir) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<crate::sys::WorkdirError>())
    {
        return match workdir.source.kind() {
            std::io::ErrorKind::NotFound
            | std::io::ErrorKind::PermissionDenied
            | std::io::ErrorKind::NotADirectory => {
                tonic::Status::invalid_argument(workdir.to_string())
            }
            _ => tonic::Status::internal(workdir.to_string()),
        };
    }
    match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
            tonic::Status::invalid_argument(format!("exec {argv0:?}: {e}"))
        }
        _ => tonic::Status::internal(format!("start {argv0:?}: {e}")),
    }
}

/// The workload's output, kept (bounded) for the host, with its exit once known.
#[derive(Debug)]
pub struct Output {
    state: Mutex<OutputState>,
    /// Bumped on every change; `Output` streams wait on it.
    changed: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct OutputState {
    streams: [Kept; 2],
    exit: Option<proto::ExitStatus>,
}

#[derive(Debug, Default)]
struct Kept {
    /// Offset of `data[0]` in the stream.
    start: u64,
    data: VecDeque<u8>,
    closed: bool,
}

/// What an `Output` stream sends next.
#[derive(Debug)]
pub enum Next {
    Events(Vec<proto::OutputEvent>, [u64; 2]),
    Done(proto::ExitStatus),
    Wait,
}

impl Default for Output {
    fn default() -> Self {
        Output {
            state: Mutex::new(OutputState::default()),
            changed: watch::channel(0).0,
        }
    }
}

impl Output {
    fn lock(&self) -> MutexGuard<'_, OutputState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn push(&self, stream: usize, bytes: &[u8]) {
        {
            let mut state = self.lock();
            let kept = &mut state.streams[stream];
            kept.data.extend(bytes);
            let excess = kept
                .data
                .len()
                .saturating_sub(warren_guest::OUTPUT_KEEP_BYTES);
            if excess > 0 {
                kept.data.drain(..excess);
                kept.start += excess as u64;
            }
        }
        self.bump();
    }

    pub fn close(&self, stream: usize) {
        self.lock().streams[stream].closed = true;
        self.bump();
    }

    pub fn closed(&self) -> bool {
        self.lock().streams.iter().all(|s| s.closed)
    }

    pub fn set_exit(&self, exit: proto::ExitStatus) {
        {
            let mut state = self.lock();
            for s in &mut state.streams {
                s.closed = true;
            }
            state.exit = Some(exit);
        }
        self.bump();
    }

    pub fn exit(&self) -> Option<proto::ExitStatus> {
        self.lock().exit
    }

    /// What a reader at `offsets` gets now: output past them (or how much was dropped), the
    /// exit once all output was read, or nothing yet.
    pub fn next(&self, offsets: [u64; 2]) -> Next {
        const MAX_CHUNK: usize = 256 << 10;
        let state = self.lock();
        let mut events = Vec::new();
        let mut at = offsets;
        for (i, kept) in state.streams.iter().enumerate() {
            let stream = if i == 0 {
                proto::Stream::Stdout
            } else {
                proto::Stream::Stderr
            };
            if at[i] < kept.start {
                events.push(proto::OutputEvent {
                    event: Some(proto::output_event::Event::Dropped(proto::Dropped {
                        stream: stream as i32,
                        offset: at[i],
                        bytes: kept.start - at[i],
                    })),
                });
                at[i] = kept.start;
            }
            let end = kept.start + kept.data.len() as u64;
            if at[i] < end {
                let skip = (at[i] - kept.start) as usize;
                let data: Vec<u8> = kept
                    .data
                    .iter()
                    .skip(skip)
                    .take(MAX_CHUNK)
                    .copied()
                    .collect();
                events.push(proto::OutputEvent {
                    event: Some(proto::output_event::Event::Chunk(proto::Chunk {
                        stream: stream as i32,
                        offset: at[i],
                        data: data.clone(),
                    })),
                });
                at[i] += data.len() as u64;
            }
        }
        if !events.is_empty() {
            return Next::Events(events, at);
        }
        match state.exit {
            Some(exit) if state.streams.iter().all(|s| s.closed) => Next::Done(exit),
            _ => Next::Wait,
        }
    }
}

/// Copies a pipe into the workload's output until end of file.
pub async fn pump(fd: OwnedFd, output: Arc<Output>, stream: usize) {
    use tokio::io::AsyncReadExt as _;
    let mut pipe = match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("warren-guest: output pipe: {e}");
            output.close(stream);
            return;
        }
    };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => output.push(stream, &buf[..n]),
        }
    }
    output.close(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    type Seen = Vec<(i32, u64, Vec<u8>)>;

    fn chunks(next: Next) -> (Seen, [u64; 2]) {
        match next {
            Next::Events(events, at) => (
                events
                    .into_iter()
                    .map(|e| match e.event {
                        Some(proto::output_event::Event::Chunk(c)) => (c.stream, c.offset, c.data),
                        Some(proto::output_event::Event::Dropped(d)) => {
                            (d.stream + 10, d.offset, d.bytes.to_string().into_bytes())
                        }
                        other => panic!("{other:?}"),
                    })
                    .collect(),
                at,
            ),
            other => panic!("{other:?}"),
        }
    }

    fn launch(argv: &[&str], env: &[&str]) -> Launch {
        Launch {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|s| s.to_string()).collect(),
            cwd: String::new(),
            uid: 0,
            gid: 0,
            root: None,
            cgroup_procs: None,
        }
    }

    #[test]
    fn programs_are_found_on_the_path_they_are_given() {
        let p = launch(&["true"], &["PATH=/a:/b/:", "X=1", "X=2"])
            .program(false)
            .unwrap();
        let paths: Vec<_> = p.paths.iter().map(|c| c.to_str().unwrap()).collect();
        assert_eq!(paths, ["/a/true", "/b/true", "./true"]);
        let env: Vec<_> = p.envp.iter().map(|c| c.to_str().unwrap()).collect();
        assert_eq!(env, ["PATH=/a:/b/:", "X=2"]);
        assert_eq!(p.enter.cwd.to_str().unwrap(), "/");
        let p = launch(&["./x", "y"], &[]).program(false).unwrap();
        assert_eq!(p.paths.len(), 1);
        assert_eq!(p.argv.len(), 2);
        let p = launch(&["sh"], &[]).program(false).unwrap();
        assert_eq!(p.paths.last().unwrap().to_str().unwrap(), "/bin/sh");
        for (bad, field) in [
            (launch(&[], &[]), "argv"),
            (launch(&["a\0b"], &[]), "argv[0]"),
            (launch(&["a"], &["NOEQUALS"]), "env[0]"),
        ] {
            let e = bad.program(false).unwrap_err();
            assert!(e.message().starts_with(field), "{}", e.message());
        }
    }

    #[test]
    fn output_is_resumed_from_offsets_and_ends_with_the_exit() {
        let out = Output::default();
        assert!(matches!(out.next([0, 0]), Next::Wait));
        out.push(0, b"hello ");
        out.push(1, b"err");
        out.push(0, b"world");
        let (got, at) = chunks(out.next([0, 0]));
        assert_eq!(
            got,
            vec![(0, 0, b"hello world".to_vec()), (1, 0, b"err".to_vec())]
        );
        assert_eq!(at, [11, 3]);
        // A reader that already has part of it gets the rest only.
        let (got, _) = chunks(out.next([6, 3]));
        assert_eq!(got, vec![(0, 6, b"world".to_vec())]);
        assert!(matches!(out.next([11, 3]), Next::Wait));
        out.set_exit(proto::ExitStatus {
            code: 3,
            signal: 0,
            oom_killed: false,
        });
        assert!(matches!(out.next([11, 3]), Next::Done(e) if e.code == 3));
        // The exit waits until the reader has everything.
        assert!(matches!(out.next([0, 3]), Next::Events(..)));
    }

    #[test]
    fn old_output_is_dropped_and_reported() {
        let out = Output::default();
        let big = vec![b'x'; warren_guest::OUTPUT_KEEP_BYTES];
        out.push(0, b"0123456789");
        out.push(0, &big);
        let (got, at) = chunks(out.next([0, 0]));
        assert_eq!(got[0], (10, 0, b"10".to_vec()));
        assert_eq!((got[1].0, got[1].1), (0, 10));
        assert_eq!(at[0], 10 + got[1].2.len() as u64);
    }
}
