//! `warren cp SRC DEST`: copies files and directories between this machine and a running
//! sandbox, as `docker cp` does; one side is `NAME:PATH`. Built on the exec API, as
//! `kubectl cp` is: the sandbox's own `tar` packs or unpacks (and `sh` tells whether the
//! destination is a directory), so it works on every backend with exec (linux, vm) and on
//! sandboxes of remote agents. What comes out of a sandbox is untrusted: entries outside the
//! path asked for, `..` and absolute paths, links that lead out of the destination, entries
//! under a symlink the sandbox sent, hard links to anything but a file this copy made, and
//! device files are skipped, set-id bits are dropped, and files belong to the local user.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use tokio::sync::mpsc;
use warren_proto::v1::{self, exec_input::Input, exec_output::Output};

use super::{Globals, ServerError, usage};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to copy: a local path, NAME:PATH in a sandbox, or `-` (a tar stream on stdin,
    /// unpacked into a directory of the sandbox).
    src: String,
    /// Where: NAME:PATH in a sandbox, a local path, or `-` (a tar stream on stdout).
    dest: String,
}

/// One side of a copy.
#[derive(Debug, PartialEq)]
enum Side {
    Local(PathBuf),
    Stdio,
    Sandbox { name: String, path: String },
}

/// `NAME:PATH` is a sandbox's path when NAME is a sandbox name (so `./a:b` and `/a:b` are
/// local, as with docker); `-` is stdin or stdout.
fn side(arg: &str) -> Side {
    if arg == "-" {
        return Side::Stdio;
    }
    match arg.split_once(':') {
        Some((name, path))
            if !name.is_empty()
                && warren_spec::validate_name("name", name).is_ok()
                && !name.contains('/') =>
        {
            Side::Sandbox {
                name: name.to_string(),
                path: path.to_string(),
            }
        }
        _ => Side::Local(PathBuf::from(arg)),
    }
}

/// Copies, or on SIGINT, SIGTERM or SIGHUP stops: the exec ends with this process, and a
/// copy out to a new local path removes what it staged (exit code 128 + the signal's).
pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    // Every thread unpacking into a local path holds a clone of `alive`: `gone` ends once
    // none is left.
    let (alive, mut gone) = mpsc::channel::<()>(1);
    match super::signals::until_signalled(copy(args, g, alive)).await? {
        Ok(copied) => copied,
        Err(signal) => {
            // The copy was dropped, its exec with it: the unpacking thread finds the stream
            // cut short and removes its staging directory (which another signal cannot
            // interrupt now: their handlers stay).
            let _ = gone.recv().await;
            Ok(signal.exit("cp"))
        }
    }
}

async fn copy(args: Args, g: &Globals, alive: mpsc::Sender<()>) -> anyhow::Result<ExitCode> {
    match (side(&args.src), side(&args.dest)) {
        (Side::Sandbox { name, path }, Side::Local(local)) => {
            copy_out(g, &name, &path, Some(local), alive).await
        }
        (Side::Sandbox { name, path }, Side::Stdio) => copy_out(g, &name, &path, None, alive).await,
        (Side::Local(local), Side::Sandbox { name, path }) => {
            copy_in(g, &local, &name, &path).await
        }
        (Side::Stdio, Side::Sandbox { name, path }) => copy_in_stream(g, &name, &path).await,
        (Side::Sandbox { .. }, Side::Sandbox { .. }) => Err(usage(
            "cp: copy between two sandboxes through this machine: cp A:PATH DIR, then cp DIR/... B:PATH",
        )),
        _ => Err(usage(
            "cp: one of SRC and DEST must be NAME:PATH in a sandbox",
        )),
    }
}

/// A sandbox path made absolute, without a trailing slash (but `/` stays `/`).
fn sandbox_path(path: &str) -> Result<String, anyhow::Error> {
    if path.is_empty() {
        return Err(usage("cp: the sandbox path is empty (NAME:/path)"));
    }
    let absolute = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let trimmed = absolute.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".into()
    } else {
        trimmed.into()
    })
}

/// `(directory, name)` of an absolute sandbox path; `None` for `/` itself.
fn split(path: &str) -> Option<(&str, &str)> {
    let (dir, name) = path.rsplit_once('/')?;
    if name.is_empty() || name == "." || name == ".." {
        return None;
    }
    Some((if dir.is_empty() { "/" } else { dir }, name))
}

/// What an exec in the sandbox gave: its exit code and its stderr.
struct Ran {
    code: i32,
    stderr: Vec<u8>,
}

impl Ran {
    /// The stderr as one line for an error message, with control characters shown escaped
    /// (a sandbox's output is untrusted: it must not drive this terminal).
    fn reason(&self) -> String {
        let text = String::from_utf8_lossy(&self.stderr);
        let line: String = text.trim().escape_debug().collect();
        let line = if line.chars().count() > 300 {
            format!("{}...", line.chars().take(300).collect::<String>())
        } else {
            line
        };
        let hint = if self.code == 127 {
            "; cp needs sh and tar in the sandbox"
        } else {
            ""
        };
        if line.is_empty() {
            format!("exit code {}{hint}", self.code)
        } else {
            format!("{line} (exit code {}{hint})", self.code)
        }
    }
}

/// Runs `command` in sandbox `name` through the exec API, its stdin from `stdin` (closed at
/// once when `None`), its stdout to `stdout` chunk by chunk (dropped when `None`), then
/// `None` once the process has ended: a stdout that stops without it was cut short. A slow
/// reader of `stdout` holds this back (awaiting, so a signal still ends the copy).
async fn exec(
    g: &Globals,
    name: &str,
    command: &[&str],
    stdin: Option<mpsc::Receiver<Vec<u8>>>,
    stdout: Option<mpsc::Sender<Option<Vec<u8>>>>,
) -> anyhow::Result<Ran> {
    let (tx, rx) = mpsc::channel::<v1::ExecInput>(16);
    let send = |input| v1::ExecInput { input: Some(input) };
    tx.send(send(Input::Start(v1::ExecStart {
        name: name.to_string(),
        command: command.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })))
    .await?;
    match stdin {
        Some(mut chunks) => {
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(chunk) = chunks.recv().await {
                    if tx.send(send(Input::Stdin(chunk))).await.is_err() {
                        return;
                    }
                }
                let _ = tx.send(send(Input::CloseStdin(true))).await;
            });
        }
        None => tx.send(send(Input::CloseStdin(true))).await?,
    }
    drop(tx);
    let mut output = super::exec::open(g, rx).await?;
    let mut stderr = Vec::new();
    loop {
        match output.message().await {
            Ok(Some(msg)) => match msg.output {
                Some(Output::Stdout(bytes)) => {
                    if let Some(out) = &stdout {
                        // The unpacking thread stopped (it failed): keep draining.
                        let _ = out.send(Some(bytes)).await;
                    }
                }
                // Enough for a reason; the rest is dropped.
                Some(Output::Stderr(bytes)) if stderr.len() < 64 << 10 => {
                    stderr.extend_from_slice(&bytes)
                }
                Some(Output::Stderr(_)) => {}
                Some(Output::ExitCode(code)) => {
                    if let Some(out) = &stdout {
                        let _ = out.send(None).await;
                    }
                    return Ok(Ran { code, stderr });
                }
                None => {}
            },
            Ok(None) => bail!("the server ended the exec without an exit code"),
            Err(s) => return Err(ServerError(s).into()),
        }
    }
}

/// Whether `path` is a directory in the sandbox (asked of its `sh`).
async fn is_dir(g: &Globals, name: &str, path: &str) -> anyhow::Result<bool> {
    let ran = exec(
        g,
        name,
        &["sh", "-c", "[ -d \"$1\" ]", "sh", path],
        None,
        None,
    )
    .await?;
    match ran.code {
        0 => Ok(true),
        1 => Ok(false),
        _ => bail!("cp: cannot look at {name}:{path}: {}", ran.reason()),
    }
}

/// Local → sandbox. Into an existing directory the source keeps its name; otherwise it is
/// created as the destination path (whose parent must exist), as `docker cp` does.
async fn copy_in(g: &Globals, local: &Path, name: &str, path: &str) -> anyhow::Result<ExitCode> {
    let meta =
        std::fs::symlink_metadata(local).with_context(|| format!("cp: {}", local.display()))?;
    let dest = sandbox_path(path)?;
    let (dir, entry) = if is_dir(g, name, &dest).await? {
        let own = local
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_os_string()))
            .ok_or_else(|| usage(format!("cp: {} has no name to copy under", local.display())))?;
        (dest.clone(), PathBuf::from(own))
    } else if path.ends_with('/') {
        bail!("cp: {name}:{dest} is not a directory in the sandbox");
    } else {
        let (dir, file) =
            split(&dest).ok_or_else(|| usage(format!("cp: cannot copy onto {name}:{dest}")))?;
        (dir.to_string(), PathBuf::from(file))
    };
    let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
    let source = local.to_path_buf();
    let packing = tokio::task::spawn_blocking(move || {
        // Whole 64 KiB messages, not one per 512-byte header or 8 KiB copy.
        let writer = std::io::BufWriter::with_capacity(64 << 10, ChunkWriter(tx));
        let mut builder = tar::Builder::new(writer);
        builder.follow_symlinks(false);
        append(&mut builder, &source, &entry, &meta)?;
        builder.into_inner()?.flush()
    });
    let unpacked = unpack_inside(g, name, &dir, rx).await;
    let packed = packing.await?;
    unpacked?;
    packed.with_context(|| format!("cp: reading {}", local.display()))?;
    Ok(ExitCode::SUCCESS)
}

/// Unpacks the tar stream `archive` carries into directory `dir` of the sandbox.
async fn unpack_inside(
    g: &Globals,
    name: &str,
    dir: &str,
    archive: mpsc::Receiver<Vec<u8>>,
) -> anyhow::Result<()> {
    let tar = ["tar", "-x", "-f", "-", "-C", dir];
    let ran = exec(g, name, &tar, Some(archive), None).await?;
    if ran.code != 0 {
        bail!("cp: unpacking in {name}:{dir} failed: {}", ran.reason());
    }
    Ok(())
}

/// stdin (a tar stream) → a directory of the sandbox.
async fn copy_in_stream(g: &Globals, name: &str, path: &str) -> anyhow::Result<ExitCode> {
    let dest = sandbox_path(path)?;
    if !is_dir(g, name, &dest).await? {
        bail!(
            "cp: {name}:{dest} is not a directory in the sandbox (a tar stream unpacks into one)"
        );
    }
    let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n @ 1..) = stdin.read(&mut buf) {
            if tx.blocking_send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    unpack_inside(g, name, &dest, rx).await?;
    Ok(ExitCode::SUCCESS)
}

/// Adds `path` (not following a symlink) to the archive as `name`, a directory with what it
/// holds; owned by root in the sandbox, as `docker cp` makes them; modes and times kept.
fn append<W: Write>(
    builder: &mut tar::Builder<W>,
    path: &Path,
    name: &Path,
    meta: &std::fs::Metadata,
) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
    header.set_uid(0);
    header.set_gid(0);
    let _ = header.set_username("root");
    let _ = header.set_groupname("root");
    let kind = meta.file_type();
    if kind.is_symlink() {
        let target = std::fs::read_link(path)?;
        header.set_size(0);
        builder.append_link(&mut header, name, target)
    } else if kind.is_dir() {
        header.set_size(0);
        builder.append_data(&mut header, name, std::io::empty())?;
        let mut children: Vec<_> = std::fs::read_dir(path)?.collect::<Result<_, _>>()?;
        children.sort_by_key(|e| e.file_name());
        for child in children {
            let meta = std::fs::symlink_metadata(child.path())?;
            append(builder, &child.path(), &name.join(child.file_name()), &meta)?;
        }
        Ok(())
    } else if kind.is_file() {
        builder.append_data(&mut header, name, std::fs::File::open(path)?)
    } else {
        // Sockets, fifos and devices: docker skips them too.
        eprintln!(
            "cp: skipping {} (not a file, directory or symlink)",
            path.display()
        );
        Ok(())
    }
}

/// Sandbox → local (`None`: the tar stream to stdout). Into an existing local directory the
/// source keeps its name; otherwise it is created as `local`. The thread unpacking into
/// `local` holds `alive` until it has cleaned up.
async fn copy_out(
    g: &Globals,
    name: &str,
    path: &str,
    local: Option<PathBuf>,
    alive: mpsc::Sender<()>,
) -> anyhow::Result<ExitCode> {
    let src = sandbox_path(path)?;
    let (dir, entry) = split(&src)
        .ok_or_else(|| usage(format!("cp: name a path under / ({name}:/etc), not {src}")))?;
    let (tx, rx) = mpsc::channel::<Option<Vec<u8>>>(8);
    let entry_name = entry.to_string();
    // A thread of its own, not the runtime's blocking pool, which the runtime waits for as
    // it shuts down: a `cp` stopped by a signal exits without waiting for a writer held up
    // by a slow reader (the thread unpacking into a local path is waited for through
    // `alive`, and ends as the stream is cut).
    let (done, unpacking) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("cp-out".into())
        .spawn(move || {
            let unpacked = match local {
                Some(local) => {
                    let unpacked = unpack(ChunkReader::new(rx), &entry_name, &local);
                    drop(alive);
                    unpacked
                }
                None => {
                    // Nothing to clean up: a stopped `cp` need not wait for a slow reader.
                    drop(alive);
                    let mut out = std::io::stdout().lock();
                    std::io::copy(&mut ChunkReader::new(rx), &mut out)
                        .and_then(|_| out.flush())
                        .map(|()| Vec::new())
                        .map_err(Into::into)
                }
            };
            let _ = done.send(unpacked);
        })
        .context("cp: cannot start a thread for the copy")?;
    let ran = exec(
        g,
        name,
        &["tar", "-c", "-f", "-", "-C", dir, entry],
        None,
        Some(tx),
    )
    .await?;
    let unpacked = unpacking
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("cp: the copy stopped")));
    if ran.code != 0 {
        bail!("cp: packing {name}:{src} failed: {}", ran.reason());
    }
    for skipped in unpacked? {
        eprintln!("cp: skipped {skipped}");
    }
    Ok(ExitCode::SUCCESS)
}

/// A path of an archive (an entry's or a hard link's target) as plain names, `.` dropped;
/// `None` when it has `..`, a root or a prefix.
fn plain(path: &Path) -> Option<PathBuf> {
    let mut plain = PathBuf::new();
    for part in path.components() {
        match part {
            Component::Normal(name) => plain.push(name),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(plain)
}

/// A file on this machine: (device, inode).
type Inode = (u64, u64);

fn inode(meta: &std::fs::Metadata) -> Inode {
    (meta.dev(), meta.ino())
}

/// What an unpacking made so far, by inode (a path may be replaced later; an inode that is
/// still there is still what the copy made).
#[derive(Default)]
struct Made {
    /// Files: a hard link may only join one of these, never a file the destination had.
    files: HashSet<Inode>,
    /// Symlinks: nothing is unpacked through one, nor hard-linked through one (they may
    /// lead anywhere in the destination directory, beside the copy).
    symlinks: HashSet<Inode>,
}

impl Made {
    /// Whether one of `path`'s parents, from `dst` down, is a symlink this copy made.
    fn through_symlink(&self, dst: &Path, path: &Path) -> bool {
        let mut at = dst.to_path_buf();
        let mut parts: Vec<_> = path.components().collect();
        parts.pop();
        parts.into_iter().any(|part| {
            at.push(part);
            std::fs::symlink_metadata(&at)
                .is_ok_and(|m| m.file_type().is_symlink() && self.symlinks.contains(&inode(&m)))
        })
    }

    /// Whether `target` (plain, under `dst`) is a file this copy made, reached through none
    /// of the symlinks it made.
    fn is_own_file(&self, dst: &Path, target: &Path) -> bool {
        !self.through_symlink(dst, target)
            && std::fs::symlink_metadata(dst.join(target))
                .is_ok_and(|m| m.file_type().is_file() && self.files.contains(&inode(&m)))
    }

    /// Notes what was just unpacked at `path` (plain, under `dst`).
    fn note(&mut self, dst: &Path, path: &Path) {
        if let Ok(meta) = std::fs::symlink_metadata(dst.join(path)) {
            let kind = meta.file_type();
            if kind.is_file() {
                self.files.insert(inode(&meta));
            } else if kind.is_symlink() {
                self.symlinks.insert(inode(&meta));
            }
        }
    }
}

/// Unpacks an archive from a sandbox whose entries should all be under `top`: into `local`
/// when it is a directory, else as `local` itself (through a temporary directory beside it,
/// renamed once complete). Returns what was skipped, described.
///
/// What the destination directory already holds beside the copy is the user's: an entry
/// under a symlink the archive made is skipped (it would land wherever the sandbox pointed
/// it, `../secret` say), and a hard link must join a file this copy made, else the copy
/// would be the user's own file (`x/key` → `.ssh/id_rsa`), to be read or changed through it.
fn unpack(reader: impl Read, top: &str, local: &Path) -> anyhow::Result<Vec<String>> {
    let into_dir = local.is_dir();
    let parent = match local.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let staging = if into_dir {
        None
    } else {
        Some(
            tempfile::Builder::new()
                .prefix(".warren-cp-")
                .tempdir_in(&parent)
                .with_context(|| format!("cp: cannot write in {}", parent.display()))?,
        )
    };
    let dst = staging.as_ref().map_or(local, |s| s.path());
    let mut archive = tar::Archive::new(reader);
    // No set-id bits from a sandbox; ownership stays this user's (the default).
    archive.set_mask(0o7000);
    archive.set_preserve_permissions(true);
    let mut skipped = Vec::new();
    let mut got_top = false;
    let mut made = Made::default();
    for entry in archive.entries().context("cp: reading the archive")? {
        let mut entry = entry.context("cp: reading the archive")?;
        let path = entry.path().context("cp: an entry's path")?.into_owned();
        let shown: String = path.display().to_string().escape_debug().collect();
        let mut parts = path.components().filter(|c| *c != Component::CurDir);
        let under_top = parts.next().is_some_and(|c| c.as_os_str() == top);
        let kind = entry.header().entry_type();
        let allowed = kind.is_file()
            || kind.is_dir()
            || kind.is_symlink()
            || kind.is_hard_link()
            || kind == tar::EntryType::Continuous;
        if !under_top || !allowed {
            skipped.push(format!(
                "{shown} ({})",
                if under_top {
                    "not a file, directory or link"
                } else {
                    "not under the path asked for"
                }
            ));
            continue;
        }
        // With `..` (or worse) `unpack_in` skips it.
        let rel = plain(&path);
        if let Some(rel) = &rel {
            if made.through_symlink(dst, rel) {
                skipped.push(format!("{shown} (under a symlink from the sandbox)"));
                continue;
            }
            if kind.is_hard_link() {
                let target = entry.link_name().ok().flatten().map(|t| t.into_owned());
                let own = target
                    .as_deref()
                    .and_then(plain)
                    .is_some_and(|t| made.is_own_file(dst, &t));
                if !own {
                    let target: String = target
                        .map_or_else(|| "nothing".into(), |t| t.display().to_string())
                        .escape_debug()
                        .collect();
                    skipped.push(format!(
                        "{shown} (a hard link to {target}, not to a file this copy made)"
                    ));
                    continue;
                }
            }
        }
        match entry.unpack_in(dst) {
            Ok(true) => {
                got_top = true;
                if let Some(rel) = &rel {
                    made.note(dst, rel);
                }
            }
            Ok(false) => skipped.push(format!("{shown} (a path out of the destination)")),
            Err(e) => skipped.push(format!("{shown} ({})", e.to_string().escape_debug())),
        }
    }
    // The archive's end is not the stream's (tar pads it): read on to the end, so that a
    // stream cut short (a `cp` stopped by a signal) fails here, before anything is moved
    // into place, and the staging directory goes.
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink())
        .context("cp: reading the archive")?;
    if !got_top {
        // Nothing landed: why is in what was skipped (a read-only destination, say).
        match skipped.first() {
            None => bail!("cp: the sandbox sent nothing to copy"),
            Some(first) => bail!(
                "cp: nothing was copied: {first}{}",
                match skipped.len() {
                    1 => String::new(),
                    n => format!(" (and {} more skipped)", n - 1),
                }
            ),
        }
    }
    if let Some(staging) = &staging {
        let made = staging.path().join(top);
        std::fs::rename(&made, local)
            .with_context(|| format!("cp: moving the copy into place at {}", local.display()))?;
    }
    Ok(skipped)
}

/// Writes into a channel, chunk by chunk (a tar builder on a blocking thread feeding exec).
struct ChunkWriter(mpsc::Sender<Vec<u8>>);

impl Write for ChunkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(buf.to_vec())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the exec ended"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads what a channel carries, chunk by chunk (exec's stdout for a tar reader), to the
/// `None` that ends it; a channel closed before that is an error, not an end of file. Blocks:
/// for a thread outside the runtime.
struct ChunkReader {
    chunks: mpsc::Receiver<Option<Vec<u8>>>,
    current: std::io::Cursor<Vec<u8>>,
    ended: bool,
}

impl ChunkReader {
    fn new(chunks: mpsc::Receiver<Option<Vec<u8>>>) -> Self {
        ChunkReader {
            chunks,
            current: std::io::Cursor::new(Vec::new()),
            ended: false,
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.current.read(buf)?;
            if n > 0 || buf.is_empty() || self.ended {
                return Ok(n);
            }
            match self.chunks.blocking_recv() {
                Some(Some(chunk)) => self.current = std::io::Cursor::new(chunk),
                Some(None) => self.ended = true,
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the copy was cut short",
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_image::testing::{Entry, layer_tar};

    #[test]
    fn sides_are_told_apart_as_docker_does() {
        assert_eq!(
            side("web:/tmp/x"),
            Side::Sandbox {
                name: "web".into(),
                path: "/tmp/x".into()
            }
        );
        assert_eq!(side("./web:x"), Side::Local("./web:x".into()));
        assert_eq!(side("/a:b"), Side::Local("/a:b".into()));
        assert_eq!(side("-"), Side::Stdio);
        assert_eq!(side("plain"), Side::Local("plain".into()));
        assert_eq!(sandbox_path("tmp/x/").unwrap(), "/tmp/x");
        assert_eq!(sandbox_path("/").unwrap(), "/");
        assert_eq!(split("/tmp/x"), Some(("/tmp", "x")));
        assert_eq!(split("/x"), Some(("/", "x")));
        assert_eq!(split("/"), None);
    }

    #[test]
    fn a_hard_link_joins_only_a_file_the_copy_made() {
        let d = tempfile::tempdir().unwrap();
        let dst = d.path();
        std::fs::write(dst.join("secret"), "private\n").unwrap();
        std::fs::create_dir(dst.join("x")).unwrap();
        std::fs::write(dst.join("x/old"), "mine\n").unwrap();
        let abs = format!("{}/secret", dst.display());
        let evil = layer_tar(&[
            Entry::dir("x/", 0o755),
            Entry::file("x/a", 0o644, b"a\n"),
            Entry::hardlink("x/hl_ok", "x/a"),
            Entry::hardlink("x/hl_dot", "./x/./a"),
            Entry::hardlink("x/hl_sibling", "secret"),
            Entry::hardlink("x/hl_dotsecret", "./secret"),
            Entry::hardlink("x/hl_up", "x/../secret"),
            Entry::hardlink("x/hl_abs", &abs),
            Entry::hardlink("x/hl_old", "x/old"),
            Entry::hardlink("x/hl_none", "x/nothing"),
            Entry::symlink("x/up", ".."),
            Entry::file("x/up/secret", 0o644, b"pwned\n"),
            Entry::hardlink("x/hl_via", "x/up/secret"),
            Entry::symlink("x/s", "a"),
            Entry::hardlink("x/hl_sym", "x/s"),
            Entry::hardlink("x/hl_\x1b[31m", "\x1b]0;t\x07"),
        ])
        .unwrap();
        let skipped = unpack(&evil[..], "x", dst).unwrap();
        let secret = std::fs::metadata(dst.join("secret")).unwrap();
        assert_eq!(
            std::fs::read_to_string(dst.join("secret")).unwrap(),
            "private\n"
        );
        assert_eq!(secret.nlink(), 1);
        assert_eq!(
            std::fs::read_to_string(dst.join("x/old")).unwrap(),
            "mine\n"
        );
        assert_eq!(std::fs::metadata(dst.join("x/old")).unwrap().nlink(), 1);
        let a = std::fs::metadata(dst.join("x/a")).unwrap();
        for ok in ["x/hl_ok", "x/hl_dot"] {
            assert_eq!(
                inode(&std::fs::metadata(dst.join(ok)).unwrap()),
                inode(&a),
                "{ok}"
            );
        }
        assert_eq!(a.nlink(), 3);
        for gone in [
            "x/hl_sibling",
            "x/hl_dotsecret",
            "x/hl_up",
            "x/hl_abs",
            "x/hl_old",
            "x/hl_none",
            "x/hl_via",
            "x/hl_sym",
            "x/hl_\x1b[31m",
        ] {
            assert!(
                std::fs::symlink_metadata(dst.join(gone)).is_err(),
                "{gone} made"
            );
        }
        for said in [
            "x/hl_sibling (a hard link to secret, not to a file this copy made)",
            "x/hl_dotsecret (a hard link to ./secret, not to a file this copy made)",
            "x/hl_up (a hard link to x/../secret, not to a file this copy made)",
            &format!("x/hl_abs (a hard link to {abs}, not to a file this copy made)"),
            "x/hl_old (a hard link to x/old, not to a file this copy made)",
            "x/hl_none (a hard link to x/nothing, not to a file this copy made)",
            "x/up/secret (under a symlink from the sandbox)",
            "x/hl_via (a hard link to x/up/secret, not to a file this copy made)",
            "x/hl_sym (a hard link to x/s, not to a file this copy made)",
            "x/hl_\\u{1b}[31m (a hard link to \\u{1b}]0;t\\u{7}, not to a file this copy made)",
        ] {
            assert!(
                skipped.iter().any(|s| s == said),
                "{said} not in {skipped:#?}"
            );
        }
        assert_eq!(skipped.len(), 10, "{skipped:#?}");
    }

    #[test]
    fn a_copy_that_lands_nowhere_says_why() {
        // sysfs takes no new files, not even root's.
        let archive = layer_tar(&[Entry::file("x", 0o644, b"data\n")]).unwrap();
        let err = unpack(&archive[..], "x", Path::new("/sys")).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.starts_with("cp: nothing was copied: x ("), "{text}");
        assert!(!Path::new("/sys/x").exists());
        // An empty archive is still "nothing sent".
        let empty = layer_tar(&[]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let err = unpack(&empty[..], "x", dir.path()).unwrap_err();
        assert_eq!(format!("{err:#}"), "cp: the sandbox sent nothing to copy");
    }

    #[test]
    fn a_hard_link_inside_a_copy_made_as_a_new_path_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let got = d.path().join("got");
        let tar = layer_tar(&[
            Entry::dir("x/", 0o755),
            Entry::dir("x/sub/", 0o755),
            Entry::file("x/sub/a", 0o644, b"a\n"),
            Entry::hardlink("x/b", "x/sub/a"),
        ])
        .unwrap();
        assert!(unpack(&tar[..], "x", &got).unwrap().is_empty());
        let a = std::fs::metadata(got.join("sub/a")).unwrap();
        assert_eq!(inode(&std::fs::metadata(got.join("b")).unwrap()), inode(&a));
        assert_eq!(std::fs::read_to_string(got.join("b")).unwrap(), "a\n");
    }

    #[test]
    fn a_stream_cut_short_moves_nothing_into_place() {
        let data = vec![7u8; 64 << 10];
        let tar = layer_tar(&[Entry::dir("x/", 0o755), Entry::file("x/a", 0o644, &data)]).unwrap();
        let d = tempfile::tempdir().unwrap();
        let got = d.path().join("got");
        // What exec sends: chunks, then `None` once the process has ended; a stream that
        // stops without it (the exec dropped on a signal) was cut short, however far it got.
        let unpack_sent = |sent: &[u8], ended: bool| {
            let (tx, rx) = mpsc::channel(2);
            tx.try_send(Some(sent.to_vec())).unwrap();
            if ended {
                tx.try_send(None).unwrap();
            }
            drop(tx);
            unpack(ChunkReader::new(rx), "x", &got)
        };
        for sent in [&tar[..tar.len() / 2], &tar[..]] {
            let err = unpack_sent(sent, false).unwrap_err();
            assert!(
                format!("{err:#}").ends_with("the copy was cut short"),
                "{err:#}"
            );
            let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().collect();
            assert!(left.is_empty(), "{left:?}");
        }
        assert!(unpack_sent(&tar, true).unwrap().is_empty());
        assert_eq!(std::fs::read(got.join("a")).unwrap(), data);
    }

    #[test]
    fn a_stderr_reason_cannot_drive_the_terminal() {
        let ran = Ran {
            code: 2,
            stderr: b"tar: \x1b[31mno\x07 such file\n".to_vec(),
        };
        assert_eq!(
            ran.reason(),
            "tar: \\u{1b}[31mno\\u{7} such file (exit code 2)"
        );
    }
}
