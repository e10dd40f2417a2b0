//! `warren bench run -b vm`: a workload run to completion N times in VMs through the API,
//! cold boots and template clones, beside a bare qemu boot of the same kernel and initramfs.
//!
//! What one timed run is. Cold: the create RPC until `WaitSandbox` returns the exit, on a
//! server without templates (qemu starts, the kernel boots, warren-guest answers, runs the
//! workload, reports its end). Clone: the same on a server with templates and a pool, once a
//! warm-up made the template and the pool holds clones (a create takes a ready clone, gives
//! it its identity and entropy, starts the workload). Bare qemu: qemu started on the same
//! kernel and initramfs with an extra cpio whose init prints a marker on the serial console
//! and reboots, timed from spawn to the marker: the physical floor of a cold boot here.
//! Cold boots run on the config's channel, and, where that is the virtio-serial port and
//! rust-vmm's `vhost-device-vsock` is installed, once more over vsock (`cold-vsock`): the
//! two channels side by side. Each phase has one untimed warm-up run first. Clone → running: on the templates server,
//! the create RPC alone (it returns once the guest acknowledged the workload's start), one at
//! a time, each once the pool has refilled (`warren info` says so): a pool hit's cost
//! (hand-out, `Prepare`, `Start`), the "clone create → guest ready". How many creates
//! were hand-outs (`backendInfo.clone_from = pool`) is printed beside it.
//!
//! With `--image NAME --image-layout DIR` every sandbox (not the bare boot) runs the image:
//! the layout is imported into both servers, the image's disk is made on its first create
//! (untimed, in the warm-up), and the clones come from a template of the image.
//!
//! The VM config is `--vm-config`'s (or `WARREN_VM_CONFIG`, or /etc/warren/vm.toml); the two
//! private servers get copies with `templates` off and on. Everything made is removed on the
//! way out: the servers and their VMs, the cgroups under the run's parent.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use warren_control::client::Client;
use warren_proto::{spec_to_pb, v1};
use warren_spec::{BackendKind, SandboxSpec};

use super::{
    Globals, Phase, PrivateServer, RunArgs, connect_retrying, create_and_wait, drive, report, usage,
};

pub(super) async fn run(a: RunArgs, g: &Globals) -> anyhow::Result<ExitCode> {
    if a.args.is_empty() {
        return Err(usage(
            "bench run -b vm: give the workload after --, e.g. `-- /bin/true`",
        ));
    }
    if g.server.is_some() {
        return Err(usage(
            "bench run -b vm starts its own servers (cold and with templates): drop --server",
        ));
    }
    let workload = Workload {
        args: a.args.clone(),
        image: (!a.image.is_empty()).then(|| a.image.clone()),
    };
    let layout = match (&workload.image, &a.image_layout) {
        (Some(_), Some(layout)) => Some(std::path::absolute(layout)?),
        (Some(image), None) => {
            return Err(usage(format!(
                "--image {image}: give --image-layout too (the bench's servers are private \
                 and start with no images)"
            )));
        }
        (None, Some(_)) => return Err(usage("--image-layout: give --image NAME too")),
        (None, None) => None,
    };
    let config = crate::commands::server::load_vm_config(a.vm_config.as_deref())
        .map_err(|e| anyhow::anyhow!("--vm-config: {e}"))?;
    let scratch = tempfile::Builder::new()
        .prefix("warren-bench-vm-")
        .tempdir()?;
    let parent = format!("warren-bench-vm-{}", std::process::id());
    let _cgroups = super::linux::CgroupSweep(parent.clone());
    if !a.json {
        out!(
            "warren bench run: backend=vm n={} c={} image={} kernel={} initrd={}",
            a.count,
            a.concurrency,
            workload.image.as_deref().unwrap_or("none (the initramfs)"),
            config.hypervisor.kernel_path.display(),
            config.hypervisor.initrd_path.display()
        );
    }
    let mut results = serde_json::Map::new();
    let mut medians = Vec::new();
    // Cold boots on the config's channel; where that is the virtio-serial port and the
    // vhost-user vsock device is installed, cold boots over vsock too; clones need the port.
    use warren_vm::config::ChannelKind;
    let mut phases = vec![("cold", false, config.hypervisor.channel)];
    if config.hypervisor.channel == ChannelKind::Serial {
        if warren_vm::config::find_program(&config.hypervisor.vhost_user_vsock_path).is_some() {
            phases.push(("cold-vsock", false, ChannelKind::VhostUserVsock));
        }
        phases.push(("clone", true, ChannelKind::Serial));
    } else {
        out!(
            "clone: skipped: hypervisor.channel = {:?} has no templates",
            config.hypervisor.channel.name()
        );
    }
    for (phase, templates, channel) in phases {
        let mut c = config.clone();
        c.hypervisor.channel = channel;
        c.vm.templates = templates;
        c.vm.pool = if templates { c.vm.pool.max(2) } else { 0 };
        c.vm.template_dir = scratch.path().join("templates");
        let file = scratch.path().join(format!("{phase}.toml"));
        std::fs::write(&file, toml::to_string(&c).context("encode the vm config")?)?;
        let server = PrivateServer::start(
            &a.server_log_level,
            None,
            &[
                "--vm-config",
                &file.display().to_string(),
                "--cgroup-parent",
                &parent,
            ],
        )?;
        let mut client = connect_retrying(&server.address, None).await?;
        let accel = accel_of(&mut client).await;
        if let (Some(layout), Some(image)) = (&layout, &workload.image) {
            super::import_layout(&server.address, None, layout, image).await?;
        }
        let prefix = format!("{phase}-{:x}", std::process::id());
        warm_up(&mut client, &prefix, &workload, templates).await?;
        let (p, w) = (prefix.clone(), workload.clone());
        let runs = drive(
            &[client.clone()],
            a.count,
            a.concurrency,
            move |mut c, i| {
                let spec = w.spec(&format!("{p}-{i}"));
                async move { create_and_wait(&mut c, &spec).await }
            },
        )
        .await?;
        // Deletes are not timed (an ended VM powers itself off meanwhile).
        let p = prefix.clone();
        drive(
            &[client.clone()],
            a.count,
            a.concurrency.max(4),
            move |mut c, i| {
                let req = v1::DeleteSandboxRequest {
                    name: format!("{p}-{i}"),
                    grace_period_seconds: Some(0),
                    id: None,
                };
                async move { c.delete_sandbox(req).await.map(|_| ()) }
            },
        )
        .await?;
        let label = format!("{phase} ({accel}; channel {})", channel.name());
        out!("{label}");
        let mut value = report(phase, &runs);
        medians.push((phase, runs.hist.value_at_quantile(0.5)));
        if templates {
            value["rss"] = clone_rss(&mut client, &prefix, &workload)
                .await
                .unwrap_or(Value::Null);
            let (ready, hits) = create_to_running(&mut client, &prefix, &workload, a.count).await?;
            out!(
                "clone create->running, pool refilled before each ({hits} of {} were hand-outs)",
                a.count
            );
            let mut r = report("ready", &ready);
            r["pool_hits"] = json!(hits);
            results.insert("clone_ready".to_string(), r);
        }
        results.insert(phase.to_string(), value);
        drop(server);
    }
    let bare = bare_boot(&config, a.peer_runs.min(a.count).max(1), scratch.path())?;
    out!("bare qemu boot to a marker (same kernel + initramfs, sequential)");
    let bare_json = report("qemu", &bare);
    let floor = bare.hist.value_at_quantile(0.5).max(1) as f64;
    for (phase, median) in &medians {
        out!(
            "median: {phase} create->exit is {:.2}x a bare qemu boot",
            *median as f64 / floor
        );
    }
    if a.json {
        out!(
            "{}",
            json!({"backend": "vm", "n": a.count, "concurrency": a.concurrency, "warren": results, "bare_qemu": bare_json})
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What every timed sandbox runs: the command, in the initramfs or in an image.
#[derive(Clone, Debug)]
struct Workload {
    args: Vec<String>,
    image: Option<String>,
}

impl Workload {
    fn spec(&self, name: &str) -> SandboxSpec {
        SandboxSpec {
            name: name.to_string(),
            backend: BackendKind::Vm,
            image: self.image.clone(),
            args: self.args.clone(),
            ..SandboxSpec::default()
        }
    }
}

async fn accel_of(client: &mut Client) -> String {
    client
        .get_server_info(v1::GetServerInfoRequest {})
        .await
        .ok()
        .and_then(|r| {
            r.into_inner()
                .backends
                .into_iter()
                .find(|b| b.name == "vm")
                .map(|b| {
                    if b.available {
                        b.detail
                    } else {
                        format!("unavailable: {}", b.reason)
                    }
                })
        })
        .unwrap_or_default()
}

/// One untimed run; with templates, runs until a create is served by a clone (the first
/// builds the template behind it) and the pool had time to fill.
async fn warm_up(
    client: &mut Client,
    prefix: &str,
    workload: &Workload,
    templates: bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    for i in 0.. {
        let spec = workload.spec(&format!("{prefix}-warm{i}"));
        create_and_wait(client, &spec)
            .await
            .map_err(|s| anyhow::anyhow!("warm-up run: {}", s.message()))?;
        let got = client
            .get_sandbox(v1::GetSandboxRequest {
                name: spec.name.clone(),
            })
            .await?
            .into_inner();
        let boot = got
            .status
            .and_then(|s| s.backend_info.get("boot").cloned())
            .unwrap_or_default();
        let _ = client
            .delete_sandbox(v1::DeleteSandboxRequest {
                name: spec.name,
                grace_period_seconds: Some(0),
                id: None,
            })
            .await;
        if !templates || boot == "clone" {
            break;
        }
        if Instant::now() > deadline {
            bail!("no create was served by a clone within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if templates {
        // Let the pool refill after the warm-up took from it.
        pool_refilled(client).await;
    }
    Ok(())
}

/// The create RPC alone (it returns once the workload started in the guest), `n` times one at
/// a time, each after an untimed pause for the pool to refill; deletes untimed. Returns the
/// timings and how many creates were handed a pooled clone.
async fn create_to_running(
    client: &mut Client,
    prefix: &str,
    workload: &Workload,
    n: usize,
) -> anyhow::Result<(Phase, usize)> {
    let mut phase = Phase {
        hist: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        elapsed: Duration::ZERO,
        errors: 0,
        first_error: None,
    };
    let mut hits = 0;
    for i in 0..n {
        pool_refilled(client).await;
        let spec = workload.spec(&format!("{prefix}-ready{i}"));
        let t = Instant::now();
        let created = client
            .create_sandbox(v1::CreateSandboxRequest {
                spec: Some(spec_to_pb(&spec)),
                ..Default::default()
            })
            .await;
        let took = t.elapsed();
        phase.elapsed += took;
        match created {
            Ok(reply) => {
                phase.hist.record(took.as_micros().max(1) as u64)?;
                let from = reply
                    .into_inner()
                    .sandbox
                    .and_then(|s| s.status)
                    .and_then(|s| s.backend_info.get("clone_from").cloned());
                hits += usize::from(from.as_deref() == Some("pool"));
            }
            Err(e) => {
                phase.errors += 1;
                phase
                    .first_error
                    .get_or_insert_with(|| e.message().to_string());
            }
        }
        let _ = client
            .delete_sandbox(v1::DeleteSandboxRequest {
                name: spec.name,
                grace_period_seconds: Some(0),
                id: None,
            })
            .await;
    }
    Ok((phase, hits))
}

/// Waits until the server's vm pool is full again (`warren info`: "pool: N clone(s) ready,
/// K kept per shape"; one shape in use here), for at most 30 s, then a moment more so the
/// refill's last restore is not competing with what comes next. A server whose detail does
/// not say gets a fixed 1.5 s.
async fn pool_refilled(client: &mut Client) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let detail = client
            .get_server_info(v1::GetServerInfoRequest {})
            .await
            .ok()
            .and_then(|r| r.into_inner().backends.into_iter().find(|b| b.name == "vm"))
            .map(|b| b.detail)
            .unwrap_or_default();
        match warren_vm::parse_pool_summary(&detail) {
            Some((ready, kept)) if ready >= kept => break,
            Some(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Some(_) => break,
            None => {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                return;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// The RSS and PSS of one idle clone's qemu.
async fn clone_rss(client: &mut Client, prefix: &str, workload: &Workload) -> Option<Value> {
    let name = format!("{prefix}-rss");
    let spec = SandboxSpec {
        args: vec!["sleep".into(), "60".into()],
        ..workload.spec(&name)
    };
    let created = client
        .create_sandbox(v1::CreateSandboxRequest {
            spec: Some(spec_to_pb(&spec)),
            ..Default::default()
        })
        .await
        .ok()?
        .into_inner();
    let pid: i32 = created
        .sandbox
        .and_then(|s| s.status)
        .and_then(|s| s.backend_info.get("pid").cloned())
        .and_then(|p| p.parse().ok())?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let field = |text: &str, key: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let rss = field(&status, "VmRSS:")?;
    let pss = field(&rollup, "Pss:");
    out!(
        "clone qemu RSS {:.1} MB, PSS {} (an idle clone running `sleep`)",
        rss as f64 / 1024.0,
        pss.map_or("?".to_string(), |p| format!("{:.1} MB", p as f64 / 1024.0))
    );
    let _ = client
        .delete_sandbox(v1::DeleteSandboxRequest {
            name,
            grace_period_seconds: Some(0),
            id: None,
        })
        .await;
    Some(json!({"rss_kb": rss, "pss_kb": pss}))
}

/// Boots qemu on the config's kernel and initramfs plus a cpio whose init prints a marker
/// and reboots; times spawn → marker, `n` times after one warm-up.
fn bare_boot(config: &warren_control::VmConfig, n: usize, scratch: &Path) -> anyhow::Result<Phase> {
    let h = &config.hypervisor;
    let initrd = marker_initrd(&h.initrd_path, scratch)?;
    let accel = if h.accel == warren_vm::config::Accel::Kvm {
        "kvm"
    } else {
        "tcg"
    };
    let machine = warren_vm::qemu::Machine {
        hypervisor: h,
        accel,
        vcpus: h.vcpus,
        memory_mb: h.memory_in_mb,
        tsc_khz: warren_vm::qemu::host_tsc_khz(),
        root_disk: None,
        memory_file: None,
        incoming: false,
        vsock_cid: 0,
    };
    let params = format!("{} rdinit=/bench-init", machine.kernel_params());
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let start = Instant::now();
    for i in 0..=n {
        let t = Instant::now();
        let mut child = Command::new(&h.path)
            .args(["-machine", &machine_arg(h)])
            .args(["-accel", accel, "-cpu", "max", "-smp", &h.vcpus.to_string()])
            .args(["-m", &format!("{}M", h.memory_in_mb)])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-nographic",
                "-no-reboot",
                "-serial",
                "stdio",
            ])
            .arg("-kernel")
            .arg(&h.kernel_path)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &params])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", h.path.display()))?;
        let stdout = child.stdout.take().context("qemu's stdout")?;
        let mut seen = false;
        for line in BufReader::new(stdout).lines() {
            if line
                .map(|l| l.contains("WARREN-BENCH-MARKER"))
                .unwrap_or(false)
            {
                seen = true;
                break;
            }
        }
        let took = t.elapsed();
        let _ = child.kill();
        let _ = child.wait();
        if !seen {
            bail!("the bare qemu boot printed no marker");
        }
        if i > 0 {
            hist.saturating_record(took.as_micros() as u64);
        }
    }
    Ok(Phase {
        hist,
        elapsed: start.elapsed(),
        errors: 0,
        first_error: None,
    })
}

fn machine_arg(h: &warren_vm::config::Hypervisor) -> String {
    if h.machine == "microvm" {
        "microvm,x-option-roms=off,rtc=on,isa-serial=on".into()
    } else {
        h.machine.clone()
    }
}

/// The initramfs with `/bench-init` appended (the kernel unpacks concatenated archives).
fn marker_initrd(initrd: &Path, scratch: &Path) -> anyhow::Result<PathBuf> {
    let stage = scratch.join("marker");
    std::fs::create_dir_all(&stage)?;
    let script = stage.join("bench-init");
    std::fs::write(
        &script,
        "#!/bin/sh\n/bin/busybox mount -t devtmpfs dev /dev\necho WARREN-BENCH-MARKER > /dev/ttyS0\n/bin/busybox reboot -f\n",
    )?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    let extra = Command::new("sh")
        .arg("-c")
        .arg("echo bench-init | busybox cpio -o -H newc 2>/dev/null")
        .current_dir(&stage)
        .output()
        .context("making a cpio with busybox")?;
    if !extra.status.success() || extra.stdout.is_empty() {
        bail!("busybox cpio failed");
    }
    let mut bytes =
        std::fs::read(initrd).with_context(|| format!("reading {}", initrd.display()))?;
    bytes.extend_from_slice(&extra.stdout);
    let out = scratch.join("marker.cpio");
    std::fs::write(&out, bytes)?;
    Ok(out)
}
