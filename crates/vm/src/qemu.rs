//! qemu's command line for one VM, and the qemu process.
//!
//! The layout of a VM's directory (its sandbox's, or a template's or pool clone's):
//! `qmp.sock` (QMP), `ctl.sock` (the virtio-serial port to warren-guest), `console.log`
//! (the guest's serial console: kernel messages, panics), `qemu.log` (qemu's own stderr).
//! With `channel = "vhost-user-vsock"` also `vhost-vsock.sock` (qemu to the vsock device),
//! `vsock.sock` (the host to the guest through it) and `vsock.log` (the device's stderr).
//!
//! A clone must be started with exactly the template's devices (migration restores device
//! state by position), so both are made by [`Machine::args`] from the same inputs.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::config::{ChannelKind, Hypervisor};

pub const QMP_SOCKET: &str = "qmp.sock";
pub const CHANNEL_SOCKET: &str = "ctl.sock";
pub const CONSOLE_LOG: &str = "console.log";
pub const QEMU_LOG: &str = "qemu.log";
/// The vhost-user vsock device's socket, which qemu connects to.
pub const VHOST_USER_SOCKET: &str = "vhost-vsock.sock";
/// The vhost-user vsock device's socket for the host's connections to the guest.
pub const VSOCK_SOCKET: &str = "vsock.sock";
pub const VSOCK_LOG: &str = "vsock.log";
/// The serial number of the sandbox image's disk; the guest finds its device by it.
pub const ROOT_DISK_SERIAL: &str = "warren-root";

/// How the guest finds the image's disk (`StartRequest.root_device`): by its serial number,
/// as device names depend on probe order.
pub fn root_device() -> String {
    format!("serial:{ROOT_DISK_SERIAL}")
}

/// Guest RAM in a file, for templates (shared, written by the template) and clones (a
/// private copy-on-write mapping of the template's file).
#[derive(Debug, Clone)]
pub struct MemoryFile {
    pub path: PathBuf,
    pub shared: bool,
}

/// Everything that decides one VM's command line.
#[derive(Debug, Clone)]
pub struct Machine<'a> {
    pub hypervisor: &'a Hypervisor,
    /// `kvm` or `tcg`.
    pub accel: &'a str,
    pub vcpus: u32,
    pub memory_mb: u64,
    /// The host's TSC frequency, given to the guest so it does not calibrate (under TCG a
    /// microvm guest sometimes hangs calibrating).
    pub tsc_khz: Option<u64>,
    /// The sandbox's image as an ext4 file, attached read-only.
    pub root_disk: Option<&'a Path>,
    pub memory_file: Option<MemoryFile>,
    /// Wait for a snapshot (`-incoming defer`) instead of booting.
    pub incoming: bool,
    /// The guest's vsock CID, for `channel = "vsock"` (unique on the host).
    pub vsock_cid: u32,
}

impl Machine<'_> {
    fn microvm(&self) -> bool {
        self.hypervisor.machine == "microvm"
    }

    /// virtio-mmio devices on microvm, virtio-pci elsewhere.
    fn virtio(&self, device: &str) -> String {
        if self.microvm() {
            format!("virtio-{device}-device")
        } else {
            format!("virtio-{device}-pci")
        }
    }

    pub fn kernel_params(&self) -> String {
        let mut p = vec![
            "console=ttyS0".to_string(),
            "reboot=t".into(),
            "panic=-1".into(),
            "rdinit=/init".into(),
            "i8042.noaux".into(),
            "i8042.nopnp".into(),
            "i8042.nokbd".into(),
            "tsc=reliable".into(),
            "no_timer_check".into(),
            "cryptomgr.notests".into(),
            "random.trust_cpu=on".into(),
            "rodata=off".into(),
            "audit=0".into(),
            "lsm=capability".into(),
            "8250.nr_uarts=1".into(),
        ];
        if !self.hypervisor.debug {
            p.push("quiet".into());
        }
        if self.microvm() {
            p.push("pci=off".into());
        }
        if let Some(khz) = self.tsc_khz {
            p.push(format!("tsc_early_khz={khz}"));
        }
        if self.hypervisor.channel.is_vsock() {
            p.push(format!(
                "{}={}",
                warren_guest::VSOCK_PARAM,
                warren_guest::VSOCK_PORT
            ));
        }
        if !self.hypervisor.kernel_params.trim().is_empty() {
            p.push(self.hypervisor.kernel_params.trim().to_string());
        }
        p.join(" ")
    }

    /// The arguments after the program, for a VM whose files live in `dir`.
    pub fn args(&self, dir: &Path) -> Vec<OsString> {
        let h = self.hypervisor;
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |parts: &[&str]| a.extend(parts.iter().map(OsString::from));
        let path = |name: &str| opt_path(&dir.join(name));
        let mut machine = h.machine.clone();
        if self.microvm() {
            machine.push_str(",x-option-roms=off,rtc=on,isa-serial=on");
        }
        let memory_object = match (&self.memory_file, h.hugepages) {
            (Some(file), _) => Some(format!(
                "memory-backend-file,id=ram,size={}M,mem-path={},share={}",
                self.memory_mb,
                opt_path(&file.path),
                if file.shared { "on" } else { "off" }
            )),
            (None, true) => Some(format!(
                "memory-backend-file,id=ram,size={}M,mem-path=/dev/hugepages,share=on",
                self.memory_mb
            )),
            // A vhost-user device reads and writes guest RAM itself: it must be shared.
            (None, false) if h.channel == ChannelKind::VhostUserVsock => Some(format!(
                "memory-backend-memfd,id=ram,size={}M,share=on",
                self.memory_mb
            )),
            (None, false) => None,
        };
        if memory_object.is_some() {
            machine.push_str(",memory-backend=ram");
        }
        let accel = if self.accel == "tcg" {
            // A bounded translation cache: qemu's default reserves 1 GiB per VM.
            "tcg,tb-size=64".to_string()
        } else {
            self.accel.to_string()
        };
        push(&["-machine", &machine, "-accel", &accel]);
        push(&["-cpu", if self.accel == "kvm" { "host" } else { "max" }]);
        push(&[
            "-smp",
            &self.vcpus.to_string(),
            "-m",
            &format!("{}M", self.memory_mb),
        ]);
        if let Some(object) = &memory_object {
            push(&["-object", object]);
        }
        push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        push(&[
            "-chardev",
            &format!("file,id=console,path={}", path(CONSOLE_LOG)),
            "-serial",
            "chardev:console",
        ]);
        push(&[
            "-kernel",
            &h.kernel_path.display().to_string(),
            "-initrd",
            &h.initrd_path.display().to_string(),
            "-append",
            &self.kernel_params(),
        ]);
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", path(QMP_SOCKET)),
        ]);
        // (`-device` names: virtio-mmio's `...-device` on microvm, else `...-pci`.)
        let bus = if self.microvm() { "device" } else { "pci" };
        match h.channel {
            ChannelKind::Serial => push(&[
                "-device",
                &self.virtio("serial"),
                "-chardev",
                &format!(
                    "socket,id=ctl,path={},server=on,wait=off",
                    path(CHANNEL_SOCKET)
                ),
                "-device",
                &format!(
                    "virtserialport,chardev=ctl,name={}",
                    warren_guest::PORT_NAME
                ),
            ]),
            ChannelKind::Vsock => push(&[
                "-device",
                &format!("vhost-vsock-{bus},guest-cid={}", self.vsock_cid),
            ]),
            ChannelKind::VhostUserVsock => push(&[
                "-chardev",
                &format!("socket,id=vsock,path={}", path(VHOST_USER_SOCKET)),
                "-device",
                &format!("vhost-user-vsock-{bus},chardev=vsock"),
            ]),
        }
        if !h.entropy_source.as_os_str().is_empty() {
            push(&[
                "-object",
                &format!("rng-random,id=rng,filename={}", opt_path(&h.entropy_source)),
                "-device",
                &format!("{},rng=rng", self.virtio("rng")),
            ]);
        }
        if let Some(disk) = self.root_disk {
            push(&[
                "-drive",
                &format!(
                    "file={},format=raw,if=none,id=root,readonly=on",
                    opt_path(disk)
                ),
                "-device",
                &format!(
                    "{},drive=root,serial={ROOT_DISK_SERIAL}",
                    self.virtio("blk")
                ),
            ]);
        }
        if !h.image_path.as_os_str().is_empty() {
            push(&[
                "-drive",
                &format!(
                    "file={},format=raw,if=none,id=image,readonly=on",
                    opt_path(&h.image_path)
                ),
                "-device",
                &format!("{},drive=image,serial=warren-image", self.virtio("blk")),
            ]);
        }
        if self.incoming {
            push(&["-incoming", "defer"]);
        }
        a
    }
}

/// The host's TSC frequency in kHz, from `/proc/cpuinfo`'s `cpu MHz`.
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

/// Starts qemu for a VM whose files live in `dir`: in its own process group (a terminal's
/// Ctrl-C to the server does not reach it), not killed with the server (VMs outlive a
/// server restart), without transparent huge pages (see [`crate::sys`]), its stderr in
/// `qemu.log`.
pub fn spawn(
    program: &Path,
    args: &[OsString],
    dir: &Path,
) -> std::io::Result<tokio::process::Child> {
    let log = std::fs::File::create(dir.join(QEMU_LOG))?;
    let err = OwnedFd::from(log.try_clone()?);
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err))
        .process_group(0)
        .kill_on_drop(false);
    crate::sys::without_huge_pages(&mut cmd);
    cmd.spawn()
}

/// The last lines of a VM's logs, for an error message: what qemu said, else the console.
pub fn last_words(dir: &Path) -> String {
    let tail = |name: &str| {
        let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        lines[lines.len().saturating_sub(3)..].join(" | ")
    };
    let qemu = tail(QEMU_LOG);
    if !qemu.is_empty() {
        return format!("qemu: {qemu}");
    }
    let console = tail(CONSOLE_LOG);
    if console.is_empty() {
        String::new()
    } else {
        format!("console: {console}")
    }
}

/// [`last_words`] in brackets after a space, to end an error message with; empty when
/// there are none.
pub fn last_words_note(dir: &Path) -> String {
    let words = last_words(dir);
    if words.is_empty() {
        words
    } else {
        format!(" ({words})")
    }
}

/// A guest kernel panic's line in the console log, if there was one.
pub fn panic_line(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(CONSOLE_LOG)).ok()?;
    text.lines()
        .find(|l| l.contains("Kernel panic"))
        .map(|l| l.trim().chars().take(200).collect())
}

/// A path as a value in a qemu option list (`key=value,...`): a comma is doubled, as qemu
/// reads `,,` as one comma, so a directory with a comma in its name stays one value.
fn opt_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn microvm_and_clone_command_lines() {
        let h = Hypervisor {
            kernel_params: "loglevel=3".into(),
            ..Hypervisor::default()
        };
        let m = Machine {
            hypervisor: &h,
            accel: "tcg",
            vcpus: 2,
            memory_mb: 256,
            tsc_khz: Some(2_445_000),
            root_disk: Some(Path::new("/img/root.ext4")),
            memory_file: Some(MemoryFile {
                path: "/dev/shm/t/ram".into(),
                shared: false,
            }),
            incoming: true,
            vsock_cid: 0,
        };
        let args: Vec<String> = m
            .args(Path::new("/vm/x"))
            .into_iter()
            .map(|a| a.into_string().expect("utf-8"))
            .collect();
        let joined = args.join(" ");
        assert!(
            joined.contains(
                "-machine microvm,x-option-roms=off,rtc=on,isa-serial=on,memory-backend=ram"
            ),
            "{joined}"
        );
        assert!(
            joined.contains("-accel tcg,tb-size=64 -cpu max -smp 2 -m 256M"),
            "{joined}"
        );
        assert!(
            joined
                .contains("memory-backend-file,id=ram,size=256M,mem-path=/dev/shm/t/ram,share=off"),
            "{joined}"
        );
        assert!(
            joined.contains("socket,id=ctl,path=/vm/x/ctl.sock,server=on,wait=off"),
            "{joined}"
        );
        assert!(
            joined.contains("virtserialport,chardev=ctl,name=warren.0"),
            "{joined}"
        );
        assert!(
            joined.contains("virtio-blk-device,drive=root,serial=warren-root"),
            "{joined}"
        );
        assert!(joined.contains("virtio-rng-device,rng=rng"), "{joined}");
        assert!(joined.ends_with("-incoming defer"), "{joined}");
        let append = &args[args.iter().position(|a| a == "-append").expect("append") + 1];
        assert!(
            append.contains("pci=off") && append.contains("tsc_early_khz=2445000"),
            "{append}"
        );
        assert!(append.ends_with("loglevel=3"), "{append}");

        let q35 = Hypervisor {
            machine: "q35".into(),
            debug: true,
            ..Hypervisor::default()
        };
        let m = Machine {
            hypervisor: &q35,
            accel: "kvm",
            vcpus: 1,
            memory_mb: 128,
            tsc_khz: None,
            root_disk: None,
            memory_file: None,
            incoming: false,
            vsock_cid: 0,
        };
        let joined: Vec<String> = m
            .args(Path::new("/vm/y"))
            .into_iter()
            .map(|a| a.into_string().expect("utf-8"))
            .collect();
        let joined = joined.join(" ");
        assert!(
            joined.contains("-machine q35 -accel kvm -cpu host"),
            "{joined}"
        );
        assert!(joined.contains("virtio-serial-pci"), "{joined}");
        assert!(
            !joined.contains("pci=off") && !joined.contains(" quiet"),
            "{joined}"
        );
        assert!(!joined.contains("-incoming"), "{joined}");
    }

    /// Paths go into qemu's `key=value,...` lists with their commas doubled: a comma in a
    /// directory name does not start another option.
    #[test]
    fn a_comma_in_a_path_stays_in_its_value() {
        let h = Hypervisor {
            entropy_source: "/dev/ent,ropy".into(),
            image_path: "/img/a,b.raw".into(),
            ..Hypervisor::default()
        };
        let m = Machine {
            hypervisor: &h,
            accel: "tcg",
            vcpus: 1,
            memory_mb: 128,
            tsc_khz: None,
            root_disk: Some(Path::new("/img/ro,ot.ext4")),
            memory_file: Some(MemoryFile {
                path: "/dev/shm/t,x/ram".into(),
                shared: true,
            }),
            incoming: false,
            vsock_cid: 0,
        };
        let joined: Vec<String> = m
            .args(Path::new("/vm/co,mma"))
            .into_iter()
            .map(|a| a.into_string().expect("utf-8"))
            .collect();
        let joined = joined.join(" ");
        for want in [
            "file,id=console,path=/vm/co,,mma/console.log",
            "unix:/vm/co,,mma/qmp.sock,server=on",
            "socket,id=ctl,path=/vm/co,,mma/ctl.sock,server=on",
            "rng-random,id=rng,filename=/dev/ent,,ropy",
            "file=/img/ro,,ot.ext4,format=raw",
            "file=/img/a,,b.raw,format=raw",
            "mem-path=/dev/shm/t,,x/ram,share=on",
        ] {
            assert!(joined.contains(want), "{want}: {joined}");
        }
    }

    #[test]
    fn vsock_channels_command_lines() {
        let args = |h: &Hypervisor, cid: u32| {
            let m = Machine {
                hypervisor: h,
                accel: "tcg",
                vcpus: 1,
                memory_mb: 192,
                tsc_khz: None,
                root_disk: None,
                memory_file: None,
                incoming: false,
                vsock_cid: cid,
            };
            let args: Vec<String> = m
                .args(Path::new("/vm/v"))
                .into_iter()
                .map(|a| a.into_string().expect("utf-8"))
                .collect();
            args.join(" ")
        };
        let user = Hypervisor {
            channel: ChannelKind::VhostUserVsock,
            ..Hypervisor::default()
        };
        let joined = args(&user, 0);
        // Guest RAM is shared with the device; no virtio-serial port.
        assert!(
            joined.contains("memory-backend=ram")
                && joined.contains("-object memory-backend-memfd,id=ram,size=192M,share=on"),
            "{joined}"
        );
        assert!(
            joined.contains(
                "-chardev socket,id=vsock,path=/vm/v/vhost-vsock.sock -device vhost-user-vsock-device,chardev=vsock"
            ),
            "{joined}"
        );
        assert!(
            !joined.contains("virtserialport") && joined.contains("warren.vsock=1024"),
            "{joined}"
        );
        let kernel = Hypervisor {
            channel: ChannelKind::Vsock,
            machine: "q35".into(),
            ..Hypervisor::default()
        };
        let joined = args(&kernel, 77);
        assert!(
            joined.contains("-device vhost-vsock-pci,guest-cid=77"),
            "{joined}"
        );
        assert!(
            !joined.contains("memory-backend") && !joined.contains("virtserialport"),
            "{joined}"
        );
        assert!(joined.contains("warren.vsock=1024"), "{joined}");
        let microvm = Hypervisor {
            channel: ChannelKind::Vsock,
            ..Hypervisor::default()
        };
        let joined = args(&microvm, 3);
        assert!(
            joined.contains("-device vhost-vsock-device,guest-cid=3"),
            "{joined}"
        );
        let serial = args(&Hypervisor::default(), 0);
        assert!(!serial.contains("vsock"), "{serial}");
    }

    #[test]
    fn last_words_are_qemus_else_the_consoles_last_three_lines() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(last_words_note(dir.path()), "");
        std::fs::write(dir.path().join(CONSOLE_LOG), "one\n\ntwo\n three \nfour\n").unwrap();
        assert_eq!(
            last_words_note(dir.path()),
            " (console: two | three | four)"
        );
        std::fs::write(dir.path().join(QEMU_LOG), "qemu-system-x86_64: bad\n").unwrap();
        assert_eq!(last_words(dir.path()), "qemu: qemu-system-x86_64: bad");
    }
}
