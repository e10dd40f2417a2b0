//! One VM's process and files: booting it cold, following qemu, ending it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use warren_runtime::{BackendError, BackendStatus};

use crate::channel::{self, Address, Client};
use crate::config::ChannelKind;
use crate::qemu;

/// Written once the VM runs: what a restarted server needs to find it again.
pub const STATE_FILE: &str = "vm.json";
/// Written when the sandbox ended: how, for a server that was not there to see it.
pub const EXIT_FILE: &str = "exit.json";
/// The workload's output, CRI format.
pub const LOG_FILE: &str = "container.log";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmState {
    pub qemu_pid: i32,
    /// qemu's start time (`/proc/PID/stat` field 22), so a recycled pid is not taken for it.
    pub qemu_start: u64,
    pub accel: String,
    /// The host cgroup qemu runs in (its name under the parent), when it has one.
    pub cgroup: Option<String>,
    /// The workload's settings, which `exec` starts from.
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    /// When the workload is killed for its timeout, in ms since the Unix epoch.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// The channel to the guest (absent in older files: the virtio-serial port). Its
    /// sockets are found in the VM's directory, wherever that is now (a pool clone's
    /// directory is renamed to its sandbox's).
    #[serde(default)]
    pub channel: ChannelKind,
    /// The guest's CID, for `channel = "vsock"`.
    #[serde(default)]
    pub vsock_cid: u32,
    /// The VM's vhost-user vsock device process, if it has one.
    #[serde(default)]
    pub vsock_device: Option<ProcessRef>,
}

impl VmState {
    /// Where the guest of the VM in `dir` is reached.
    pub fn address(&self, dir: &Path) -> Address {
        Address::of(dir, self.channel, self.vsock_cid)
    }

    /// Kills what is left of the VM: qemu and its vsock device, each unless its pid now
    /// names another process.
    pub fn kill(&self) {
        QemuRef {
            pid: self.qemu_pid,
            start: self.qemu_start,
        }
        .kill();
        if let Some(device) = self.vsock_device {
            device.kill();
        }
    }
}

/// How a sandbox ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExitRecord {
    #[serde(default)]
    pub code: Option<i32>,
    #[serde(default)]
    pub stopped: bool,
    #[serde(default)]
    pub failed: Option<String>,
}

impl ExitRecord {
    pub fn status(&self) -> BackendStatus {
        match (self.stopped, &self.failed, self.code) {
            (true, _, _) => BackendStatus::Stopped,
            (false, Some(reason), _) => BackendStatus::Failed {
                reason: reason.clone(),
            },
            (false, None, Some(code)) => BackendStatus::Exited { code },
            (false, None, None) => BackendStatus::Failed {
                reason: "ended without an exit status".into(),
            },
        }
    }

    pub fn of(status: &BackendStatus) -> ExitRecord {
        match status {
            BackendStatus::Exited { code } => ExitRecord {
                code: Some(*code),
                stopped: false,
                failed: None,
            },
            BackendStatus::Failed { reason } => ExitRecord {
                code: None,
                stopped: false,
                failed: Some(reason.clone()),
            },
            _ => ExitRecord {
                code: None,
                stopped: true,
                failed: None,
            },
        }
    }
}

pub use warren_linux::config::{read_json, write_json};

/// A qemu process: ours (a child) or found again after a restart (a pidfd).
#[derive(Debug)]
pub struct QemuProcess {
    pub pid: i32,
    pub start: u64,
    waiter: Waiter,
}

#[derive(Debug)]
enum Waiter {
    Child(tokio::process::Child),
    Pidfd(AsyncFd<std::os::fd::OwnedFd>),
    Ended(String),
}

/// Enough to kill a qemu (or a VM's vsock device) from anywhere: its pid and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuRef {
    pub pid: i32,
    pub start: u64,
}

/// A process of a VM's besides qemu (its vhost-user vsock device).
pub type ProcessRef = QemuRef;

impl QemuRef {
    pub fn alive(&self) -> bool {
        warren_linux::config::process_start_time(self.pid) == Some(self.start) && !zombie(self.pid)
    }

    /// SIGKILL, unless the pid now belongs to another process.
    pub fn kill(&self) {
        if warren_linux::config::process_start_time(self.pid) == Some(self.start) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .unwrap_or(true)
}

impl QemuProcess {
    pub fn child(child: tokio::process::Child) -> QemuProcess {
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        QemuProcess {
            pid,
            start: warren_linux::config::process_start_time(pid).unwrap_or(0),
            waiter: Waiter::Child(child),
        }
    }

    /// The qemu `state` names, if it still runs.
    pub fn adopt(pid: i32, start: u64) -> Option<QemuProcess> {
        let r = QemuRef { pid, start };
        if !r.alive() {
            return None;
        }
        let fd = crate::sys::pidfd_open(pid).ok()?;
        Some(QemuProcess {
            pid,
            start,
            waiter: Waiter::Pidfd(crate::sys::watch_pidfd(fd).ok()?),
        })
    }

    pub fn reference(&self) -> QemuRef {
        QemuRef {
            pid: self.pid,
            start: self.start,
        }
    }

    pub fn running(&mut self) -> bool {
        match &mut self.waiter {
            Waiter::Child(c) => matches!(c.try_wait(), Ok(None)),
            Waiter::Pidfd(_) => self.reference().alive(),
            Waiter::Ended(_) => false,
        }
    }

    /// Waits for qemu's end; says how it ended. Cancel-safe; returns at once once ended.
    pub async fn wait(&mut self) -> String {
        let how = match &mut self.waiter {
            Waiter::Ended(how) => return how.clone(),
            Waiter::Child(c) => match c.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt as _;
                    match (status.code(), status.signal()) {
                        (Some(code), _) => format!("exited with status {code}"),
                        (None, Some(sig)) => format!("was killed by signal {sig}"),
                        _ => "ended".to_string(),
                    }
                }
                Err(e) => format!("could not be waited for ({e})"),
            },
            Waiter::Pidfd(fd) => {
                let _ = fd.readable().await;
                "ended".to_string()
            }
        };
        self.waiter = Waiter::Ended(how.clone());
        how
    }

    /// Kills qemu and waits for its end (at most `patience`).
    pub async fn kill_and_wait(&mut self, patience: Duration) {
        if let Waiter::Child(c) = &mut self.waiter {
            let _ = c.start_kill();
        } else {
            self.reference().kill();
        }
        let _ = tokio::time::timeout(patience, self.wait()).await;
    }
}

/// A VM that booted and answers.
#[derive(Debug)]
pub struct Booted {
    pub qemu: QemuProcess,
    pub client: Client,
    /// Its guest takes a seed in `Start` (see [`channel::Ready`]).
    pub start_seeds: bool,
    /// Its guest applies `Start`'s `storage_bytes` (see [`channel::Ready`]).
    pub storage_limit: bool,
    /// Where its guest is reached.
    pub address: Address,
    /// Where its client connects: moved with the VM's directory.
    pub target: channel::Target,
    /// Its vhost-user vsock device, killed if this is dropped before [`Device::keep`].
    pub device: Option<Device>,
}

/// How a cold boot's guest is reached.
#[derive(Debug, Clone)]
pub struct Link {
    pub address: Address,
    /// The vhost-user vsock device program to start beside qemu, if the channel needs one.
    pub device: Option<PathBuf>,
}

/// A VM's vhost-user vsock device process (rust-vmm's `vhost-device-vsock`): it serves the
/// guest's virtio-vsock device to qemu over `vhost-vsock.sock`, and the host's connections
/// to the guest on `vsock.sock`. It outlives a server restart, as qemu does, and is killed
/// when the VM ends (or when this is dropped before [`Device::keep`]).
#[derive(Debug)]
pub struct Device {
    process: ProcessRef,
    kept: bool,
}

impl Device {
    /// Starts the device for the VM in `dir`, in `cgroup`, and waits until qemu can connect
    /// to it, for at most `patience` (part of the VM's boot time).
    pub async fn start(
        program: &Path,
        dir: &Path,
        cgroup: Option<&warren_linux::cgroup::Cgroup>,
        patience: Duration,
    ) -> Result<Device, BackendError> {
        let log = std::fs::File::create(dir.join(qemu::VSOCK_LOG))
            .map_err(|e| BackendError::io("create", &dir.join(qemu::VSOCK_LOG), e))?;
        let err = log
            .try_clone()
            .map_err(|e| BackendError::io("open", &dir.join(qemu::VSOCK_LOG), e))?;
        let socket = dir.join(qemu::VHOST_USER_SOCKET);
        let mut cmd = tokio::process::Command::new(program);
        // The guest's CID only matters to this device (each VM has its own).
        cmd.arg("--guest-cid")
            .arg("3")
            .arg("--socket")
            .arg(&socket)
            .arg("--uds-path")
            .arg(dir.join(qemu::VSOCK_SOCKET))
            // Its log is a file nothing rotates: warnings only, whatever the server's is.
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::from(log))
            .stderr(std::process::Stdio::from(err))
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|e| BackendError::Io {
            action: "start the vsock device (hypervisor.vhost_user_vsock_path)",
            path: program.display().to_string(),
            source: e,
        })?;
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        let device = Device {
            process: ProcessRef {
                pid,
                start: warren_linux::config::process_start_time(pid).unwrap_or(0),
            },
            kept: false,
        };
        if let Some(cg) = cgroup {
            cg.add_pid(pid).map_err(|e| {
                BackendError::Other(format!(
                    "move the vsock device into its cgroup: {}",
                    warren_runtime::error_chain(&e)
                ))
            })?;
        }
        let deadline = tokio::time::Instant::now() + patience;
        while !socket.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(BackendError::Other(format!(
                    "the vsock device {} ended ({status}) before it listened{}",
                    program.display(),
                    tail_note(&dir.join(qemu::VSOCK_LOG))
                )));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(BackendError::Other(format!(
                    "the vsock device {} did not listen on {} within {patience:?} \
                     (hypervisor.boot_timeout_ms){}",
                    program.display(),
                    socket.display(),
                    tail_note(&dir.join(qemu::VSOCK_LOG))
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(device)
    }

    pub fn process(&self) -> ProcessRef {
        self.process
    }

    /// Keeps the device running past this handle (the VM's monitor ends it).
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if !self.kept {
            self.process.kill();
        }
    }
}

/// The last line of a log, in brackets after a space; empty when there is none.
fn tail_note(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    match text.lines().rev().map(str::trim).find(|l| !l.is_empty()) {
        Some(line) => format!(" ({})", line.chars().take(200).collect::<String>()),
        None => String::new(),
    }
}

/// Starts qemu with `args` in `dir` (and the channel's device first, if it has one) and
/// waits until warren-guest answers.
pub async fn boot(
    program: &Path,
    args: &[std::ffi::OsString],
    dir: &Path,
    patience: Duration,
    cgroup: Option<&warren_linux::cgroup::Cgroup>,
    link: &Link,
) -> Result<Booted, BackendError> {
    // The whole boot, the vsock device's start included, gets `patience`.
    let began = tokio::time::Instant::now();
    let device = match &link.device {
        Some(program) => Some(Device::start(program, dir, cgroup, patience).await?),
        None => None,
    };
    let child = qemu::spawn(program, args, dir).map_err(|e| BackendError::Io {
        action: "start qemu",
        path: program.display().to_string(),
        source: e,
    })?;
    let mut qemu = QemuProcess::child(child);
    if let Some(cg) = cgroup
        && let Err(e) = cg.add_pid(qemu.pid)
    {
        qemu.kill_and_wait(Duration::from_secs(5)).await;
        return Err(BackendError::Other(format!(
            "move qemu into its cgroup: {}",
            warren_runtime::error_chain(&e)
        )));
    }
    if !matches!(link.address, Address::Serial { .. }) {
        // Over vsock the host connects only once the guest says it listens: connections
        // that reached vhost-device-vsock before the guest's driver had set up its queues
        // were dropped ("a backend event before vring initialization"), and in about one
        // boot in 50 here every later connection of that VM was then reset by the device.
        match guest_waiting(dir, &mut qemu, patience.saturating_sub(began.elapsed())).await {
            Ok(()) => {}
            Err(Some(how)) => return Err(boot_error(dir, "", Some(how))),
            Err(None) => {
                qemu.kill_and_wait(Duration::from_secs(5)).await;
                return Err(boot_error(
                    dir,
                    &format!("the guest did not listen on vsock within {patience:?}"),
                    None,
                ));
            }
        }
    }
    let patience = patience.saturating_sub(began.elapsed());
    match channel::ready(&link.address, patience, || qemu.running()).await {
        Ok(ready) => Ok(Booted {
            qemu,
            client: ready.client,
            start_seeds: ready.start_seeds,
            storage_limit: ready.storage_limit,
            address: link.address.clone(),
            target: ready.target,
            device,
        }),
        Err(e) => {
            let how = if qemu.running() {
                qemu.kill_and_wait(Duration::from_secs(5)).await;
                None
            } else {
                Some(qemu.wait().await)
            };
            Err(boot_error(dir, &e.to_string(), how))
        }
    }
}

/// Waits until the guest of the VM in `dir` says on its console that it waits for a host
/// ([`warren_guest::WAITING_FOR_HOST`]: its channel is open), for at most `patience`.
/// `Err(Some(how))`: qemu ended, and how; `Err(None)`: the time ran out (qemu still runs).
pub async fn guest_waiting(
    dir: &Path,
    qemu: &mut QemuProcess,
    patience: Duration,
) -> Result<(), Option<String>> {
    let console = dir.join(qemu::CONSOLE_LOG);
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains(warren_guest::WAITING_FOR_HOST) {
            return Ok(());
        }
        if !qemu.running() {
            return Err(Some(qemu.wait().await));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(None);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Why a VM did not come up, with qemu's or the console's last words.
pub fn boot_error(dir: &Path, what: &str, qemu_end: Option<String>) -> BackendError {
    let mut msg = match qemu_end {
        Some(how) => format!("the VM did not boot: qemu {how}"),
        None => format!("the VM did not boot: {what}"),
    };
    msg.push_str(&qemu::last_words_note(dir));
    BackendError::Other(msg)
}

/// A VM directory's path for a sandbox.
pub fn sandbox_dir(root: &Path, id: &str) -> PathBuf {
    root.join(id)
}
