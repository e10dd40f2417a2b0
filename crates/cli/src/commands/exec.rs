//! `warren exec NAME -- CMD...`: runs a process inside a running sandbox, with this
//! terminal's stdin/stdout/stderr, and exits with its exit code.

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::process::ExitCode;

use anyhow::Context as _;
use tokio::sync::mpsc;
use warren_proto::v1::{self, exec_input::Input, exec_output::Output};

use super::{Globals, ServerError, answer, key_values, usage};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Keep stdin open and send it to the process (otherwise it reads end-of-file).
    #[arg(long, short = 'i')]
    interactive: bool,
    /// Give the process a terminal (stderr is merged into stdout). Its input is then a
    /// terminal's, not a byte stream: lines of at most 4095 bytes, control characters act
    /// (^C interrupts), and the end of stdin arrives as ^D. Pipe data with -i alone. TERM is
    /// xterm unless -e sets it.
    #[arg(long, short = 't')]
    tty: bool,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Working directory inside the sandbox.
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    /// Run as UID[:GID].
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Sandbox name.
    name: String,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Puts the terminal in raw mode while it lives (with -it), so keys go to the process.
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enable(on: bool) -> RawMode {
        use nix::sys::termios;
        if !on || !std::io::stdin().is_terminal() {
            return RawMode(None);
        }
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        if termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &raw).is_err() {
            return RawMode(None);
        }
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

fn terminal_size() -> v1::TerminalSize {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into memory we own; fd 1 is ours to query.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) };
    if rc < 0 || ws.ws_row == 0 {
        return v1::TerminalSize { rows: 24, cols: 80 };
    }
    v1::TerminalSize {
        rows: u32::from(ws.ws_row),
        cols: u32::from(ws.ws_col),
    }
}

/// Opens the exec stream: what `input` carries goes to the server (an `ExecStart` first).
pub(super) async fn open(
    g: &Globals,
    input: mpsc::Receiver<v1::ExecInput>,
) -> anyhow::Result<tonic::Streaming<v1::ExecOutput>> {
    let mut client = g.connect().await?;
    answer(
        client
            .exec(tokio_stream::wrappers::ReceiverStream::new(input))
            .await,
    )
}

/// Runs the process, or on SIGINT, SIGTERM or SIGHUP (^C typed under -it is a byte for the
/// process, not a signal) stops: the terminal leaves raw mode as the exec is dropped, the
/// process ends with this client (the server ends an exec whose client has gone), and the
/// exit code is 128 + the signal's.
pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    match super::signals::until_signalled(exec(args, g)).await? {
        Ok(ran) => ran,
        Err(signal) => Ok(signal.exit("exec")),
    }
}

async fn exec(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    if args.command.first().is_none_or(|c| c.is_empty()) {
        return Err(usage("exec: give a command after --"));
    }
    let mut env = key_values("--env", &args.env)?;
    if args.tty {
        // A terminal has a type, as `docker exec -t` says: xterm, which every terminfo
        // database has (the user's own may be missing from the sandbox's).
        env.entry("TERM".to_string())
            .or_insert_with(|| "xterm".to_string());
    }
    let (tx, rx) = mpsc::channel::<v1::ExecInput>(64);
    let send = |input| v1::ExecInput { input: Some(input) };
    tx.send(send(Input::Start(v1::ExecStart {
        name: args.name.clone(),
        command: args.command.clone(),
        env: env.into_iter().collect(),
        working_dir: args.workdir.clone(),
        user: args.user.clone(),
        tty: args.tty,
        size: args.tty.then(terminal_size),
    })))
    .await?;
    if args.interactive {
        let tx = tx.clone();
        // Reading stdin blocks; a thread of its own keeps it off the runtime.
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.blocking_send(send(Input::CloseStdin(true)));
                        return;
                    }
                    Ok(n) => {
                        if tx
                            .blocking_send(send(Input::Stdin(buf[..n].to_vec())))
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
    } else {
        tx.send(send(Input::CloseStdin(true))).await?;
    }
    if args.tty {
        let tx = tx.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut winch) = signal(SignalKind::window_change()) else {
                return;
            };
            while winch.recv().await.is_some() {
                if tx.send(send(Input::Resize(terminal_size()))).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let mut output = open(g, rx).await?;
    let _raw = RawMode::enable(args.tty && args.interactive);
    let writer = Writer::start()?;
    loop {
        let msg = match output.message().await {
            Ok(Some(m)) => m,
            // What came before the error goes out before it is said.
            Ok(None) => {
                writer.settle().await;
                anyhow::bail!("the server ended the exec without an exit code")
            }
            Err(s) => {
                writer.settle().await;
                return Err(ServerError(s).into());
            }
        };
        // The process's bytes are untrusted but go out as they are, like `docker exec`.
        let written = match msg.output {
            Some(Output::Stdout(b)) => writer.write(Chunk::Stdout(b)).await,
            Some(Output::Stderr(b)) => writer.write(Chunk::Stderr(b)).await,
            Some(Output::ExitCode(code)) => {
                // What the process wrote goes out before its exit code does.
                return Ok(match writer.finish().await {
                    Ok(()) => ExitCode::from(code.clamp(0, 255) as u8),
                    Err(_) => ExitCode::from(1),
                });
            }
            None => true,
        };
        if !written {
            return Ok(ExitCode::from(1));
        }
    }
}

/// Where a process's output goes: this process's stdout or stderr.
#[derive(Debug)]
pub(super) enum Chunk {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// Writes to this process's stdout and stderr on a thread of its own, fed through a channel:
/// a reader that stops reading (a full pipe, a terminal on ^S) then blocks that thread, not
/// the runtime, so a signal still ends the command. Such a command exits without waiting
/// for the thread (exiting ends it).
#[derive(Debug)]
pub(super) struct Writer {
    chunks: mpsc::Sender<Chunk>,
    done: tokio::sync::oneshot::Receiver<std::io::Result<()>>,
}

impl Writer {
    pub(super) fn start() -> anyhow::Result<Writer> {
        let (chunks, mut rx) = mpsc::channel::<Chunk>(16);
        let (done_tx, done) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("output".into())
            .spawn(move || {
                let mut written = Ok(());
                while let Some(chunk) = rx.blocking_recv() {
                    written = match chunk {
                        Chunk::Stdout(b) => {
                            let mut out = std::io::stdout().lock();
                            out.write_all(&b).and_then(|()| out.flush())
                        }
                        Chunk::Stderr(b) => std::io::stderr().lock().write_all(&b),
                    };
                    if written.is_err() {
                        break;
                    }
                }
                let _ = done_tx.send(written);
            })
            .context("cannot start a thread to write the output")?;
        Ok(Writer { chunks, done })
    }

    /// Queues `chunk`, waiting while the queue is full; false once a write has failed (a
    /// closed pipe).
    pub(super) async fn write(&self, chunk: Chunk) -> bool {
        self.chunks.send(chunk).await.is_ok()
    }

    /// Waits (a few seconds at most: a reader may have stopped reading) until everything
    /// queued is written, before an error is said.
    pub(super) async fn settle(self) {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.finish()).await;
    }

    /// Waits until everything queued is written.
    pub(super) async fn finish(self) -> std::io::Result<()> {
        drop(self.chunks);
        self.done
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("the output thread stopped")))
    }
}
