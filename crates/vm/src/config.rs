//! The vm backend's configuration: a TOML file whose `[hypervisor]` table has Kuasar's
//! fields (seed 002) plus `accel` and `machine`, and a `[vm]` table for warren's own
//! settings (templates, pool, health checks). Every field has a default, so an empty file
//! (or none) works when the assets are where `scripts/vm-assets.sh --install` puts them.
//!
//! ```toml
//! [hypervisor]
//! path = "/usr/bin/qemu-system-x86_64"
//! vcpus = 1
//! memory_in_mb = 256
//! kernel_path = "/var/lib/warren/vm/vmlinux"
//! image_path = ""                 # a raw disk image for every VM (read-only); "" = none
//! initrd_path = "/var/lib/warren/vm/initramfs.cpio"
//! kernel_params = ""              # appended to warren's own
//! hugepages = false               # guest RAM from /dev/hugepages
//! entropy_source = "/dev/urandom" # a virtio-rng device reads it; also seeds clones
//! debug = false                   # the guest console verbose, in console.log
//! accel = "auto"                  # "kvm", "tcg" or "auto" (KVM when it works here)
//! machine = "microvm"
//! channel = "serial"              # the host<->guest channel: "serial", "vsock" or "vhost-user-vsock"
//! vhost_user_vsock_path = "vhost-device-vsock"  # the device for channel = "vhost-user-vsock"
//!
//! [vm]
//! templates = true                # create sandboxes as clones of a booted template
//! pool = 2                        # clones kept ready per template
//! ```
//!
//! [`VmConfig::validate`] checks everything it can without booting (files exist, numbers in
//! range, the machine type is one qemu knows) and names the field and value of every problem.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Least guest RAM: Debian's kernel keeps ~60 MB of it for itself.
pub const MIN_MEMORY_MB: u64 = 128;
/// Most vCPUs a sandbox may ask for.
pub const MAX_VCPUS: u32 = 64;
/// Where `scripts/vm-assets.sh --install` puts the kernel and initramfs.
pub const DEFAULT_ASSETS: &str = "/var/lib/warren/vm";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    /// Kuasar's `[sandbox]` table is accepted (its sample config has an empty one).
    pub sandbox: Option<toml::Table>,
    pub hypervisor: Hypervisor,
    pub vm: Settings,
}

/// Seed 002's `[hypervisor]` table, with qemu's `accel` and `machine`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Hypervisor {
    pub path: PathBuf,
    pub vcpus: u32,
    pub memory_in_mb: u64,
    pub kernel_path: PathBuf,
    pub image_path: PathBuf,
    pub initrd_path: PathBuf,
    pub kernel_params: String,
    pub hugepages: bool,
    pub entropy_source: PathBuf,
    pub debug: bool,
    pub accel: Accel,
    pub machine: String,
    /// The channel between the host and warren-guest.
    pub channel: ChannelKind,
    /// The vhost-user vsock device (rust-vmm's `vhost-device-vsock`) for
    /// `channel = "vhost-user-vsock"`: a path, or a name looked up in `PATH`.
    pub vhost_user_vsock_path: PathBuf,
    /// Kuasar's virtiofsd table is accepted and ignored: warren shares images as block
    /// devices, not over virtiofs.
    pub virtiofsd: Option<toml::Table>,
}

impl Default for Hypervisor {
    fn default() -> Self {
        Hypervisor {
            path: PathBuf::from("qemu-system-x86_64"),
            vcpus: 1,
            memory_in_mb: 256,
            kernel_path: Path::new(DEFAULT_ASSETS).join("vmlinux"),
            image_path: PathBuf::new(),
            initrd_path: Path::new(DEFAULT_ASSETS).join("initramfs.cpio"),
            kernel_params: String::new(),
            hugepages: false,
            entropy_source: PathBuf::from("/dev/urandom"),
            debug: false,
            accel: Accel::Auto,
            machine: "microvm".to_string(),
            channel: ChannelKind::Serial,
            vhost_user_vsock_path: PathBuf::from(VHOST_USER_VSOCK),
            virtiofsd: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
    Auto,
}

/// The channel that carries the task API between the host and warren-guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChannelKind {
    /// A virtio-serial port on a unix socket of qemu's: needs nothing from the host
    /// kernel, and VMs on it can be snapshot (templates and clones).
    #[default]
    Serial,
    /// virtio-vsock served by the host kernel (`/dev/vhost-vsock`, the `vhost_vsock`
    /// module); the host connects with `AF_VSOCK` to the guest's CID.
    Vsock,
    /// virtio-vsock served by a vhost-user device process per VM (rust-vmm's
    /// `vhost-device-vsock`), which the host reaches on a unix socket (Firecracker's hybrid
    /// vsock: `CONNECT <port>`). Needs no host kernel module; qemu cannot snapshot it.
    VhostUserVsock,
}

impl ChannelKind {
    pub fn name(self) -> &'static str {
        match self {
            ChannelKind::Serial => "serial",
            ChannelKind::Vsock => "vsock",
            ChannelKind::VhostUserVsock => "vhost-user-vsock",
        }
    }

    pub fn is_vsock(self) -> bool {
        self != ChannelKind::Serial
    }
}

/// The default `hypervisor.vhost_user_vsock_path`; `scripts/install-deps.sh` installs it.
pub const VHOST_USER_VSOCK: &str = "vhost-device-vsock";
/// The host kernel's vsock device, which `channel = "vsock"` needs.
pub const VHOST_VSOCK_DEVICE: &str = "/dev/vhost-vsock";

/// warren's own `[vm]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Create sandboxes as copy-on-write clones of a booted template (one per shape, and per
    /// image for sandboxes with one).
    pub templates: bool,
    /// Clones kept restored and ready per template (0: restore on demand).
    pub pool: usize,
    /// Where templates keep guest RAM (a shared-memory file system).
    pub template_dir: PathBuf,
    /// Longest a cold boot may take until the guest answers.
    pub boot_timeout_ms: u64,
    /// Health pings: how often, how long each may take, how many may fail in a row before
    /// the sandbox is marked Failed.
    pub health_interval_ms: u64,
    pub health_timeout_ms: u64,
    pub health_failures: u32,
    /// Memory qemu itself may use beyond guest RAM (its cgroup's limit is the sum).
    pub qemu_overhead_mb: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            templates: true,
            pool: 2,
            template_dir: PathBuf::from("/dev/shm/warren-vm"),
            boot_timeout_ms: 30_000,
            health_interval_ms: 2_000,
            health_timeout_ms: 3_000,
            health_failures: 3,
            qemu_overhead_mb: 512,
        }
    }
}

impl Settings {
    pub fn boot_timeout(&self) -> Duration {
        Duration::from_millis(self.boot_timeout_ms)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    /// A field with a value that cannot work: names both.
    #[error("{field}: {value:?} {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
}

fn invalid(
    field: &'static str,
    value: impl std::fmt::Display,
    reason: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

impl VmConfig {
    /// Reads a config file; a missing file gives the defaults only when `required` is false.
    pub fn load(path: &Path, required: bool) -> Result<VmConfig, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(VmConfig::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    pub fn parse(text: &str, origin: &str) -> Result<VmConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string().trim_end().replace('\n', " "),
        })
    }

    /// Checks what can be checked without booting. `machines` are the machine types the
    /// qemu binary knows (`-machine help`).
    pub fn validate(&self, machines: &[String]) -> Result<(), ConfigError> {
        let h = &self.hypervisor;
        if h.vcpus == 0 || h.vcpus > MAX_VCPUS {
            return Err(invalid(
                "hypervisor.vcpus",
                h.vcpus,
                format!("is not between 1 and {MAX_VCPUS}"),
            ));
        }
        if h.memory_in_mb < MIN_MEMORY_MB {
            return Err(invalid(
                "hypervisor.memory_in_mb",
                h.memory_in_mb,
                format!("is below the minimum of {MIN_MEMORY_MB} (the guest kernel keeps ~60 MB)"),
            ));
        }
        for (field, path, required) in [
            ("hypervisor.kernel_path", &h.kernel_path, true),
            ("hypervisor.initrd_path", &h.initrd_path, true),
            ("hypervisor.image_path", &h.image_path, false),
            ("hypervisor.entropy_source", &h.entropy_source, false),
        ] {
            if path.as_os_str().is_empty() {
                if required {
                    return Err(invalid(field, "", "is empty"));
                }
                continue;
            }
            if !path.exists() {
                let hint = if field == "hypervisor.kernel_path" || field == "hypervisor.initrd_path"
                {
                    " (scripts/vm-assets.sh --install DIR builds it)"
                } else {
                    ""
                };
                return Err(invalid(
                    field,
                    path.display(),
                    format!("does not exist{hint}"),
                ));
            }
            // What qemu reads as a file; the entropy source may be a device too. A FIFO
            // would block whoever opens it until a writer came.
            use std::os::unix::fs::FileTypeExt as _;
            let kind = std::fs::metadata(path).map(|m| m.file_type());
            let ok = match &kind {
                Ok(t) if field == "hypervisor.entropy_source" => t.is_file() || t.is_char_device(),
                // A raw disk may be a block device (an LVM volume, an nbd).
                Ok(t) if field == "hypervisor.image_path" => t.is_file() || t.is_block_device(),
                Ok(t) => t.is_file(),
                Err(_) => false,
            };
            if !ok {
                let want = match field {
                    "hypervisor.entropy_source" => "is not a regular file or a character device",
                    "hypervisor.image_path" => "is not a regular file or a block device",
                    _ => "is not a regular file",
                };
                return Err(invalid(field, path.display(), want));
            }
        }
        if h.hugepages && !Path::new("/dev/hugepages").is_dir() {
            return Err(invalid(
                "hypervisor.hugepages",
                true,
                "needs hugetlbfs mounted on /dev/hugepages",
            ));
        }
        if h.machine == "none" {
            return Err(invalid(
                "hypervisor.machine",
                "none",
                "has no CPU or devices to boot a guest on (microvm or q35 do)",
            ));
        }
        if !machines.is_empty() && !machines.contains(&h.machine) {
            let mut known: Vec<&str> = machines.iter().map(String::as_str).take(8).collect();
            known.sort_unstable();
            return Err(invalid(
                "hypervisor.machine",
                &h.machine,
                format!(
                    "is not a machine type {} knows (e.g. {})",
                    h.path.display(),
                    known.join(", ")
                ),
            ));
        }
        if h.kernel_params.contains(['\n', '\0']) {
            return Err(invalid(
                "hypervisor.kernel_params",
                &h.kernel_params,
                "contains a newline or NUL",
            ));
        }
        let s = &self.vm;
        if h.channel.is_vsock() && s.templates {
            return Err(invalid(
                "vm.templates",
                true,
                format!(
                    "cannot be used with hypervisor.channel = \"{}\": clones are snapshots, \
                     and qemu cannot snapshot a vhost-user device (warren does not clone over \
                     kernel vsock either yet); set templates = false, or use channel = \"serial\"",
                    h.channel.name()
                ),
            ));
        }
        match h.channel {
            ChannelKind::Serial => {}
            ChannelKind::Vsock if !Path::new(VHOST_VSOCK_DEVICE).exists() => {
                return Err(invalid(
                    "hypervisor.channel",
                    "vsock",
                    format!(
                        "needs {VHOST_VSOCK_DEVICE} (the host kernel's vhost_vsock module), which \
                         this host lacks; use \"vhost-user-vsock\" or \"serial\""
                    ),
                ));
            }
            ChannelKind::VhostUserVsock if find_program(&h.vhost_user_vsock_path).is_none() => {
                return Err(invalid(
                    "hypervisor.vhost_user_vsock_path",
                    h.vhost_user_vsock_path.display(),
                    "is not an executable file here or in PATH (scripts/install-deps.sh \
                     installs vhost-device-vsock)",
                ));
            }
            _ => {}
        }
        if s.health_interval_ms == 0 || s.health_timeout_ms == 0 || s.health_failures == 0 {
            return Err(invalid(
                "vm.health_interval_ms/health_timeout_ms/health_failures",
                format!(
                    "{}/{}/{}",
                    s.health_interval_ms, s.health_timeout_ms, s.health_failures
                ),
                "must all be above 0",
            ));
        }
        if s.boot_timeout_ms == 0 {
            return Err(invalid("vm.boot_timeout_ms", 0, "must be above 0"));
        }
        if s.pool > 64 {
            return Err(invalid("vm.pool", s.pool, "is more than 64"));
        }
        Ok(())
    }
}

/// This host's memory and swap in MB (`MemTotal` + `SwapTotal` of /proc/meminfo), if it
/// can be read: more guest RAM than that, qemu cannot map.
pub fn host_memory_mb() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = |key: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((kb("MemTotal:")? + kb("SwapTotal:").unwrap_or(0)) / 1024)
}

/// `program` as a path to run: itself when it names a path, else found in `PATH`; `None`
/// when that is no executable file.
pub fn find_program(program: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.as_os_str().is_empty() {
        return None;
    }
    if program.components().count() > 1 {
        return executable(program).then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

/// How the VMs of this node are accelerated, found once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acceleration {
    /// `kvm` or `tcg`.
    pub accel: &'static str,
    /// Why, for `warren info` ("/dev/kvm is PVM, no vmx/svm: TCG").
    pub why: String,
}

/// Picks KVM when it works on this host, else TCG. KVM works when /dev/kvm opens read-write
/// and the CPU shows hardware virtualization (`vmx`/`svm`): a /dev/kvm without them is a
/// software nested-virtualization driver (PVM) that Debian's kernel does not boot under.
pub fn probe_accel(
    requested: Accel,
    cpuinfo: &str,
    kvm_opens: bool,
) -> Result<Acceleration, ConfigError> {
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    match requested {
        Accel::Tcg => Ok(Acceleration {
            accel: "tcg",
            why: "accel = \"tcg\" in the config".into(),
        }),
        Accel::Kvm if kvm_opens => Ok(Acceleration {
            accel: "kvm",
            why: "accel = \"kvm\" in the config".into(),
        }),
        Accel::Kvm => Err(invalid(
            "hypervisor.accel",
            "kvm",
            "cannot be used: /dev/kvm does not open read-write",
        )),
        Accel::Auto if kvm_opens && hw => Ok(Acceleration {
            accel: "kvm",
            why: "/dev/kvm with hardware virtualization".into(),
        }),
        Accel::Auto if kvm_opens => Ok(Acceleration {
            accel: "tcg",
            why: "/dev/kvm is there but the CPU has no vmx/svm (software nested virtualization such as PVM): TCG".into(),
        }),
        Accel::Auto => Ok(Acceleration {
            accel: "tcg",
            why: "no usable /dev/kvm: TCG".into(),
        }),
    }
}

/// The machine types a qemu binary knows, from `-machine help`.
pub fn machine_types(help: &str) -> Vec<String> {
    help.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kuasar_config_parses_with_accel_and_machine() {
        let text = r#"
[sandbox]
[hypervisor]
  path = "/usr/bin/qemu-system-x86_64"
  vcpus = 2
  memory_in_mb = 512
  kernel_path = "/k"
  image_path = ""
  initrd_path = "/i"
  kernel_params = "loglevel=3"
  hugepages = false
  entropy_source = "/dev/urandom"
  debug = true
  accel = "tcg"
  machine = "q35"
[hypervisor.virtiofsd]
  path = "/usr/local/bin/virtiofsd"
"#;
        let c = VmConfig::parse(text, "vm.toml").expect("parse");
        assert_eq!(c.hypervisor.vcpus, 2);
        assert_eq!(c.hypervisor.memory_in_mb, 512);
        assert_eq!(c.hypervisor.accel, Accel::Tcg);
        assert_eq!(c.hypervisor.machine, "q35");
        assert!(c.hypervisor.debug);
        assert_eq!(c.vm, Settings::default());
    }

    #[test]
    fn bad_values_name_the_field() {
        let machines = vec!["microvm".to_string(), "q35".to_string()];
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f");
        std::fs::write(&file, "x").expect("write");
        let good = |c: &mut VmConfig| {
            c.hypervisor.kernel_path = file.clone();
            c.hypervisor.initrd_path = file.clone();
        };
        let mut c = VmConfig::default();
        good(&mut c);
        c.validate(&machines).expect("valid");
        type Change = Box<dyn Fn(&mut VmConfig)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|c| c.hypervisor.memory_in_mb = 64),
                "hypervisor.memory_in_mb: \"64\" is below the minimum of 128",
            ),
            (Box::new(|c| c.hypervisor.vcpus = 0), "hypervisor.vcpus"),
            (
                Box::new(|c| c.hypervisor.machine = "pc-bogus".into()),
                "hypervisor.machine: \"pc-bogus\" is not a machine type",
            ),
            (
                Box::new(|c| c.hypervisor.kernel_path = "/nope/vmlinux".into()),
                "hypervisor.kernel_path: \"/nope/vmlinux\" does not exist",
            ),
            (
                Box::new(|c| c.hypervisor.image_path = "/nope.img".into()),
                "hypervisor.image_path",
            ),
            (
                Box::new(|c| c.vm.health_failures = 0),
                "vm.health_interval_ms/health_timeout_ms/health_failures",
            ),
            (
                Box::new(|c| c.vm.boot_timeout_ms = 0),
                "vm.boot_timeout_ms: \"0\" must be above 0",
            ),
            (
                Box::new(|c| c.hypervisor.kernel_params = "a\0b".into()),
                "hypervisor.kernel_params: \"a\\0b\" contains a newline or NUL",
            ),
            (
                Box::new(|c| c.hypervisor.machine = "none".into()),
                "hypervisor.machine: \"none\" has no CPU or devices",
            ),
            (
                Box::new(|c| c.hypervisor.kernel_path = "/tmp".into()),
                "hypervisor.kernel_path: \"/tmp\" is not a regular file",
            ),
            (
                Box::new(|c| c.hypervisor.image_path = "/tmp".into()),
                "hypervisor.image_path: \"/tmp\" is not a regular file or a block device",
            ),
            (
                Box::new(|c| c.hypervisor.entropy_source = "/tmp".into()),
                "hypervisor.entropy_source: \"/tmp\" is not a regular file or a character device",
            ),
        ];
        for (change, want) in cases {
            let mut c = VmConfig::default();
            good(&mut c);
            change(&mut c);
            let err = c.validate(&machines).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err}");
        }
        // A FIFO as the entropy source would block its reader until a writer came.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut c = VmConfig::default();
        good(&mut c);
        c.hypervisor.entropy_source = fifo.clone();
        let err = c.validate(&machines).unwrap_err().to_string();
        assert!(
            err.contains("is not a regular file or a character device"),
            "{err}"
        );
        // Devices are what entropy sources usually are.
        c.hypervisor.entropy_source = "/dev/urandom".into();
        c.validate(&machines).expect("a character device");
        // And one that became a FIFO after the check does not hold up its reader.
        let seed = crate::monitor::entropy(&fifo);
        assert_eq!(seed.len(), 64);
        assert_ne!(seed, vec![0u8; 64], "fell back to urandom");

        // The channel: vsock has no templates; vhost-user-vsock needs its device program;
        // kernel vsock needs /dev/vhost-vsock.
        let mut c = VmConfig::default();
        good(&mut c);
        c.hypervisor.channel = ChannelKind::VhostUserVsock;
        c.hypervisor.vhost_user_vsock_path = "/bin/sh".into();
        let err = c.validate(&machines).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "vm.templates: \"true\" cannot be used with hypervisor.channel = \"vhost-user-vsock\""
            ),
            "{err}"
        );
        c.vm.templates = false;
        c.validate(&machines)
            .expect("vhost-user-vsock without templates");
        for missing in ["/nope/vhost-device-vsock", "no-such-program-here"] {
            c.hypervisor.vhost_user_vsock_path = missing.into();
            let err = c.validate(&machines).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!(
                    "hypervisor.vhost_user_vsock_path: {missing:?} is not an executable file"
                )),
                "{err}"
            );
        }
        // A file that is not executable is not the device either.
        c.hypervisor.vhost_user_vsock_path = file.clone();
        let err = c.validate(&machines).unwrap_err().to_string();
        assert!(
            err.starts_with("hypervisor.vhost_user_vsock_path:")
                && err.contains("not an executable"),
            "{err}"
        );
        // Templates are refused first: the device's path does not matter then.
        c.vm.templates = true;
        let err = c.validate(&machines).unwrap_err().to_string();
        assert!(err.starts_with("vm.templates:"), "{err}");
        c.vm.templates = false;
        c.hypervisor.channel = ChannelKind::Vsock;
        let err = c.validate(&machines).map_err(|e| e.to_string());
        if Path::new(VHOST_VSOCK_DEVICE).exists() {
            err.expect("kernel vsock without templates, on a host with /dev/vhost-vsock");
        } else {
            let err = err.unwrap_err();
            assert!(
                err.starts_with("hypervisor.channel: \"vsock\" needs /dev/vhost-vsock"),
                "{err}"
            );
        }
        let c = VmConfig::parse("[hypervisor]\nchannel = \"vhost-user-vsock\"", "x.toml")
            .expect("parse");
        assert_eq!(c.hypervisor.channel, ChannelKind::VhostUserVsock);
        let err = VmConfig::parse("[hypervisor]\nchannel = \"pipe\"", "x.toml").unwrap_err();
        assert!(err.to_string().contains("channel"), "{err}");
        let err = VmConfig::parse("[hypervisor]\nmemory_in_mb = \"lots\"", "x.toml").unwrap_err();
        assert!(err.to_string().contains("memory_in_mb"), "{err}");
        let err = VmConfig::parse("[hypervisor]\naccel = \"hvf\"", "x.toml").unwrap_err();
        assert!(err.to_string().contains("accel"), "{err}");
    }

    #[test]
    fn accel_probe() {
        let pvm = "processor : 0\nflags : fpu vme sse sse2 hypervisor\n";
        let vmx = "flags : fpu vmx sse\n";
        assert_eq!(
            probe_accel(Accel::Auto, pvm, true).expect("auto").accel,
            "tcg"
        );
        assert!(
            probe_accel(Accel::Auto, pvm, true)
                .expect("auto")
                .why
                .contains("PVM")
        );
        assert_eq!(
            probe_accel(Accel::Auto, vmx, true).expect("auto").accel,
            "kvm"
        );
        assert_eq!(
            probe_accel(Accel::Auto, vmx, false).expect("auto").accel,
            "tcg"
        );
        assert_eq!(
            probe_accel(Accel::Kvm, pvm, true).expect("forced").accel,
            "kvm"
        );
        assert!(probe_accel(Accel::Kvm, vmx, false).is_err());
        assert_eq!(
            probe_accel(Accel::Tcg, vmx, true).expect("tcg").accel,
            "tcg"
        );
    }

    #[test]
    fn machine_help_is_parsed() {
        let help = "Supported machines are:\nmicrovm              microvm (i386)\npc                   Standard PC (alias of pc-i440fx-7.2)\nq35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)\n";
        assert_eq!(machine_types(help), ["microvm", "pc", "q35"]);
    }
}
