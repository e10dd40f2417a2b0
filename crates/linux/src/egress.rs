//! `network.mode: egress` on linux: a veth pair into the sandbox's network namespace, routed
//! and masqueraded by the host, and an nftables allow-list of the policy's destinations.
//!
//! # Shape
//!
//! - **Addresses** come from a range the server owns (`--linux-egress-cidr`, default
//!   `198.18.0.0/15`: RFC 2544's benchmarking block, which no LAN or public service uses, so
//!   it clashes with nothing the host routes). Each sandbox gets a `/30`: the host's end of
//!   the pair is `.1`, the sandbox's `eth0` is `.2`, its default route goes to `.1`. The
//!   host's end is named after its address (`wr` + eight hex digits), so a name says which
//!   range and sandbox it belongs to.
//! - **Routing**: the host forwards (`net.ipv4.ip_forward` is turned on, as docker does) and
//!   masquerades what leaves the range, so the destination needs no route back.
//! - **Filtering**: one nftables table per range (`inet warren_<range>`), written whole at
//!   the server's start ([`reconcile`]), and a chain per sandbox added by its supervisor
//!   ([`setup`]) and removed when its workload ends or it is deleted ([`teardown`]). Packets
//!   from a sandbox's interface jump (a verdict map keyed by interface name) to its chain:
//!   its own source address only, established and related traffic, the listed networks (and
//!   ports, TCP and UDP), then `reject` (admin-prohibited, so a denied connect fails at
//!   once). New connections *to* the range are dropped; replies pass. IPv6 from a sandbox is
//!   rejected: it gets IPv4 only.
//! - **Crashes**: the kernel removes a veth pair with the namespace (the last process of the
//!   sandbox); an nftables chain is what a killed supervisor leaves, and the next server start
//!   rewrites the table from the sandboxes still alive, in one atomic transaction. The
//!   table goes ([`remove_table`]) once no sandbox holds a `/30` of the range.
//!
//! The host side is configured with Debian's `ip` (iproute2) and `nft` (nftables), installed
//! by `scripts/install-egress.sh`; the sandbox side with `nsenter -n ip`. Three short
//! processes per egress sandbox (~10 ms), nothing for other sandboxes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The server's default range.
pub const DEFAULT_RANGE: &str = "198.18.0.0/15";

/// One sandbox's network: its `/30` and the policy's destinations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Egress {
    /// The server's range (the table's name and the masquerade rule come from it): its
    /// network address and prefix length.
    pub base: Ipv4Addr,
    pub prefix: u8,
    /// Which `/30` of the range.
    pub index: u32,
    /// Destinations: IPv4 networks, each with inclusive port ranges (none: every port).
    pub allow: Vec<Destination>,
    /// Most bits per second each way (the sandbox's `network_bandwidth`); `None` unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    /// `a.b.c.d/n`.
    pub net: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<(u16, u16)>,
}

/// Errors setting up or removing a sandbox's network.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("{tool} is not installed ({why}); run scripts/install-egress.sh")]
    Missing { tool: &'static str, why: String },
    #[error("{what} failed: {message}")]
    Command { what: String, message: String },
    #[error("the egress range {range} has no free /30 left")]
    Full { range: Ipv4Net },
    #[error("{range} is not a usable egress range (an IPv4 network of /29 or larger)")]
    BadRange { range: String },
}

impl Egress {
    pub fn range(&self) -> Ipv4Net {
        Ipv4Net::new(self.base, self.prefix).unwrap_or_else(|_| Ipv4Net::from(self.base))
    }

    /// The `/30`'s network address.
    fn network(&self) -> u32 {
        u32::from(self.base).wrapping_add(self.index.wrapping_mul(4))
    }

    /// The host's end of the pair.
    pub fn host_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network() + 1)
    }

    /// The sandbox's `eth0`.
    pub fn sandbox_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network() + 2)
    }

    /// The host's end's name (at most 15 bytes).
    pub fn host_if(&self) -> String {
        format!("wr{:08x}", u32::from(self.host_addr()))
    }

    fn chain(&self) -> String {
        format!("sb_{}", self.host_if())
    }
}

/// Parses a range given on the command line.
pub fn parse_range(s: &str) -> Result<Ipv4Net, EgressError> {
    let bad = || EgressError::BadRange {
        range: s.to_string(),
    };
    let net: Ipv4Net = s.parse().map_err(|_| bad())?;
    if net.trunc() != net || net.prefix_len() > 29 {
        return Err(bad());
    }
    Ok(net)
}

/// How many `/30`s a range holds.
pub fn slots(range: Ipv4Net) -> u32 {
    1u32.checked_shl(30 - u32::from(range.prefix_len()))
        .unwrap_or(u32::MAX)
}

/// The table of a range: `warren_198_18_0_0_15`.
pub fn table(range: Ipv4Net) -> String {
    format!(
        "warren_{}_{}",
        range.network().to_string().replace('.', "_"),
        range.prefix_len()
    )
}

/// The base table: written whole (replacing what was there) with the chains of `live`.
pub fn table_script(range: Ipv4Net, live: &[Egress]) -> String {
    let t = table(range);
    let mut s = String::new();
    // Declaring then deleting makes the delete succeed whether or not the table exists;
    // the whole file is one transaction, so there is never a moment without the rules.
    let _ = writeln!(s, "table inet {t} {{}}\ndelete table inet {t}");
    let _ = writeln!(
        s,
        "table inet {t} {{
\tmap egress {{ type ifname : verdict; }}
\tchain forward {{
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname vmap @egress
\t\tip daddr {range} ct state established,related accept
\t\tip daddr {range} drop
\t}}
\tchain input {{
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname vmap @egress
\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr {range} ip daddr != {range} masquerade
\t}}
}}"
    );
    for e in live {
        s.push_str(&chain_script(e));
    }
    s
}

/// Adds (or replaces) one sandbox's chain and its entry in the verdict map.
pub fn chain_script(e: &Egress) -> String {
    let (t, c, i) = (table(e.range()), e.chain(), e.host_if());
    let mut s = String::new();
    let _ = writeln!(s, "add chain inet {t} {c}\nflush chain inet {t} {c}");
    let rule = |s: &mut String, body: &str| {
        let _ = writeln!(s, "add rule inet {t} {c} {body}");
    };
    rule(
        &mut s,
        "meta nfproto ipv6 reject with icmpx type admin-prohibited",
    );
    rule(&mut s, &format!("ip saddr != {} drop", e.sandbox_addr()));
    rule(&mut s, "ct state established,related accept");
    for d in &e.allow {
        if d.ports.is_empty() {
            rule(&mut s, &format!("ip daddr {} accept", d.net));
        } else {
            let ports: Vec<String> = d
                .ports
                .iter()
                .map(|&(lo, hi)| {
                    if lo == hi {
                        lo.to_string()
                    } else {
                        format!("{lo}-{hi}")
                    }
                })
                .collect();
            rule(
                &mut s,
                &format!(
                    "ip daddr {} meta l4proto {{ tcp, udp }} th dport {{ {} }} accept",
                    d.net,
                    ports.join(", ")
                ),
            );
        }
    }
    rule(&mut s, "reject with icmpx type admin-prohibited");
    let _ = writeln!(s, "add element inet {t} egress {{ \"{i}\" : jump {c} }}");
    s
}

/// Removes one sandbox's map entry and chain. Adding them first makes the deletes succeed
/// whether or not they exist (a transaction fails whole on a missing object).
pub fn teardown_script(e: &Egress) -> String {
    let (t, c, i) = (table(e.range()), e.chain(), e.host_if());
    format!(
        "add chain inet {t} {c}\nadd element inet {t} egress {{ \"{i}\" : jump {c} }}\n\
         delete element inet {t} egress {{ \"{i}\" }}\ndelete chain inet {t} {c}\n"
    )
}

/// The host side of the pair (for `ip -batch -`), the peer created in `pid`'s namespace
/// (named by its file: a pid would be read in `ip`'s own pid namespace).
fn host_batch(e: &Egress, pid: i32) -> String {
    let i = e.host_if();
    format!(
        "link add {i} type veth peer name eth0 netns /proc/{pid}/ns/net\naddr add {}/30 dev {i}\nlink set {i} up\n",
        e.host_addr()
    )
}

/// The sandbox side (for `ip -batch -` in its namespace).
fn sandbox_batch(e: &Egress) -> String {
    format!(
        "addr add {}/30 dev eth0\nlink set eth0 up\nroute add default via {}\n",
        e.sandbox_addr(),
        e.host_addr()
    )
}

/// Where a tool is: `$PATH`, then the usual sbin directories (a server started by systemd
/// or a test may have a short `$PATH`).
pub fn tool(name: &'static str) -> Result<PathBuf, EgressError> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .filter(|d| !d.is_empty())
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| EgressError::Missing {
            tool: name,
            why: "not in $PATH, /usr/sbin or /sbin".to_string(),
        })
}

/// Makes this process's next children start in its own pid namespace. A supervisor
/// unshared a new one for the container's init: tools started later would land in the
/// sandbox's namespace (visible to it, and impossible to start once its init has died).
fn children_in_own_pid_namespace() -> Result<(), EgressError> {
    let fail = |message: String| EgressError::Command {
        what: "enter the supervisor's own pid namespace".to_string(),
        message,
    };
    let own = std::fs::read_link("/proc/self/ns/pid").map_err(|e| fail(e.to_string()))?;
    let children =
        std::fs::read_link("/proc/self/ns/pid_for_children").map_err(|e| fail(e.to_string()))?;
    if own == children {
        return Ok(());
    }
    let ns = std::fs::File::open("/proc/self/ns/pid").map_err(|e| fail(e.to_string()))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWPID).map_err(|e| fail(e.to_string()))
}

/// Runs `program args` with `input` on stdin; its stderr is the error.
fn run(what: &str, program: &Path, args: &[&str], input: &str) -> Result<(), EgressError> {
    let fail = |message: String| EgressError::Command {
        what: what.to_string(),
        message,
    };
    children_in_own_pid_namespace()?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("start {}: {e}", program.display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| fail(format!("write to {}: {e}", program.display())))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("wait for {}: {e}", program.display())))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', "; "),
        ))
    }
}

/// Turns IPv4 forwarding on (the host routes for its sandboxes), if it is off.
fn enable_forwarding() -> Result<(), EgressError> {
    const KEY: &str = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(KEY).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(KEY, "1").map_err(|e| EgressError::Command {
        what: format!("write 1 to {KEY}"),
        message: e.to_string(),
    })
}

/// Gives the sandbox whose init is `pid` (its network namespace made, nothing in it yet)
/// its pair, addresses, route and chain. Run by its supervisor before the workload starts.
pub fn setup(e: &Egress, pid: i32) -> Result<(), EgressError> {
    let (ip, nft, nsenter) = (tool("ip")?, tool("nft")?, tool("nsenter")?);
    enable_forwarding()?;
    // The chain first: traffic is filtered from the first packet.
    run(
        "nft (add the sandbox's chain)",
        &nft,
        &["-f", "-"],
        &chain_script(e),
    )?;
    run(
        "ip (host side of the veth pair)",
        &ip,
        &["-batch", "-"],
        &host_batch(e, pid),
    )?;
    let net = format!("--net=/proc/{pid}/ns/net");
    run(
        "ip (sandbox side)",
        &nsenter,
        &[&net, ip.to_str().unwrap_or("ip"), "-batch", "-"],
        &sandbox_batch(e),
    )?;
    match e.bandwidth {
        Some(bits) => shape(e, pid, Some(bits)),
        None => Ok(()),
    }
}

/// Sets the sandbox's bandwidth, both ways, or lifts it (`None`): a token bucket (`tbf`)
/// as the root queue of each end of the pair. The host's end limits what the sandbox
/// receives; the sandbox's `eth0` what it sends (its capabilities do not let it change that
/// queue). Two short `tc` processes.
pub fn shape(e: &Egress, pid: i32, bandwidth: Option<u64>) -> Result<(), EgressError> {
    let (tc, nsenter) = (tool("tc")?, tool("nsenter")?);
    let net = format!("--net=/proc/{pid}/ns/net");
    let tc_path = tc.to_str().unwrap_or("tc");
    let (host, sandbox) = (
        qdisc_command(&e.host_if(), bandwidth),
        qdisc_command("eth0", bandwidth),
    );
    let lifted = |r: Result<(), EgressError>| match r {
        // Lifting a limit that was never set.
        Err(EgressError::Command { message, .. })
            if bandwidth.is_none() && is_no_qdisc(&message) =>
        {
            Ok(())
        }
        other => other,
    };
    lifted(run("tc (host side)", &tc, &["-batch", "-"], &host))?;
    lifted(run(
        "tc (sandbox side)",
        &nsenter,
        &[&net, tc_path, "-batch", "-"],
        &sandbox,
    ))
}

/// `tc -batch` input setting or removing `dev`'s root token bucket.
fn qdisc_command(dev: &str, bandwidth: Option<u64>) -> String {
    match bandwidth {
        Some(bits) => {
            let (rate, burst) = tbf_rate_and_burst(bits);
            format!("qdisc replace dev {dev} root tbf rate {rate}bit burst {burst} latency 50ms\n")
        }
        None => format!("qdisc del dev {dev} root\n"),
    }
}

/// The bucket for `bits` per second: its rate, and its size in bytes: 10 ms of traffic, but
/// never under ten full-size frames (a bucket smaller than a frame passes nothing).
fn tbf_rate_and_burst(bits: u64) -> (u64, u64) {
    (bits, (bits / 8 / 100).max(10 * 1514))
}

fn is_no_qdisc(message: &str) -> bool {
    message.contains("Cannot delete qdisc with handle of zero")
        || message.contains("No such file or directory")
        || message.contains("Invalid handle")
}

/// Removes what [`setup`] made (the pair too, if the namespace still holds it). Idempotent.
pub fn teardown(e: &Egress) -> Result<(), EgressError> {
    let mut first = None;
    if let Ok(ip) = tool("ip")
        && Path::new("/sys/class/net").join(e.host_if()).exists()
        && let Err(err) = run(
            "ip (delete the veth pair)",
            &ip,
            &["link", "del", &e.host_if()],
            "",
        )
    {
        first = Some(err);
    }
    run(
        "nft (delete the sandbox's chain)",
        &tool("nft")?,
        &["-f", "-"],
        &teardown_script(e),
    )?;
    first.map_or(Ok(()), Err)
}

/// Removes a range's table (no sandbox holds a `/30` of it any more). Idempotent.
pub fn remove_table(range: Ipv4Net) -> Result<(), EgressError> {
    let t = table(range);
    run(
        "nft (delete the egress table)",
        &tool("nft")?,
        &["-f", "-"],
        // Declared first, so the delete succeeds whether or not the table exists.
        &format!("table inet {t} {{}}\ndelete table inet {t}\n"),
    )
}

/// Rewrites a range's table from the sandboxes still alive (a server's start).
pub fn reconcile(range: Ipv4Net, live: &[Egress]) -> Result<(), EgressError> {
    run(
        "nft (rewrite the egress table)",
        &tool("nft")?,
        &["-f", "-"],
        &table_script(range, live),
    )
}

/// Which `/30`s of the range are taken, by sandbox id.
#[derive(Debug, Default)]
pub struct Pool {
    taken: BTreeMap<u32, String>,
}

impl Pool {
    pub fn take(&mut self, range: Ipv4Net, id: &str) -> Result<u32, EgressError> {
        let free = (0..slots(range))
            .find(|i| !self.taken.contains_key(i))
            .ok_or(EgressError::Full { range })?;
        self.taken.insert(free, id.to_string());
        Ok(free)
    }

    /// Marks `index` taken by `id` (an adopted sandbox).
    pub fn mark(&mut self, index: u32, id: &str) {
        self.taken.insert(index, id.to_string());
    }

    pub fn release(&mut self, id: &str) {
        self.taken.retain(|_, owner| owner != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Egress {
        Egress {
            base: Ipv4Addr::new(198, 18, 0, 0),
            prefix: 15,
            index: 1,
            allow: vec![
                Destination {
                    net: "10.0.0.0/8".to_string(),
                    ports: vec![(443, 443), (8000, 8080)],
                },
                Destination {
                    net: "192.0.2.7/32".to_string(),
                    ports: Vec::new(),
                },
            ],
            bandwidth: None,
        }
    }

    #[test]
    fn a_bandwidth_is_a_token_bucket_on_each_end() {
        assert_eq!(
            qdisc_command("wrc6120005", Some(100_000_000)),
            "qdisc replace dev wrc6120005 root tbf rate 100000000bit burst 125000 latency 50ms\n"
        );
        // Slow links still get a bucket that holds whole frames.
        assert_eq!(tbf_rate_and_burst(1_000_000), (1_000_000, 15_140));
        assert_eq!(qdisc_command("eth0", None), "qdisc del dev eth0 root\n");
        // Written only when set: container.json of sandboxes without one is unchanged.
        let json = serde_json::to_string(&sample()).unwrap();
        assert!(!json.contains("bandwidth"), "{json}");
        let limited = Egress {
            bandwidth: Some(8_000_000),
            ..sample()
        };
        let back: Egress = serde_json::from_str(&serde_json::to_string(&limited).unwrap()).unwrap();
        assert_eq!(back, limited);
    }

    #[test]
    fn addresses_and_names_come_from_the_index() {
        let e = sample();
        assert_eq!(e.host_addr(), Ipv4Addr::new(198, 18, 0, 5));
        assert_eq!(e.sandbox_addr(), Ipv4Addr::new(198, 18, 0, 6));
        assert_eq!(e.host_if(), "wrc6120005");
        assert!(e.host_if().len() <= 15);
        assert_eq!(table(e.range()), "warren_198_18_0_0_15");
        assert_eq!(slots(e.range()), 32768);
        assert_eq!(slots("10.1.2.0/29".parse().unwrap()), 2);
    }

    #[test]
    fn the_chain_allows_the_list_and_rejects_the_rest() {
        let s = chain_script(&sample());
        let t = "inet warren_198_18_0_0_15 sb_wrc6120005";
        assert!(
            s.contains(&format!("add rule {t} ip saddr != 198.18.0.6 drop")),
            "{s}"
        );
        assert!(
            s.contains(&format!(
                "add rule {t} ip daddr 10.0.0.0/8 meta l4proto {{ tcp, udp }} th dport {{ 443, 8000-8080 }} accept"
            )),
            "{s}"
        );
        assert!(
            s.contains(&format!("add rule {t} ip daddr 192.0.2.7/32 accept")),
            "{s}"
        );
        // The reject comes last, after every accept.
        let reject = s
            .find("reject with icmpx type admin-prohibited\nadd element")
            .unwrap();
        assert!(s.rfind("accept").unwrap() < reject, "{s}");
        assert!(s.ends_with(
            "add element inet warren_198_18_0_0_15 egress { \"wrc6120005\" : jump sb_wrc6120005 }\n"
        ));
        let table = table_script(sample().range(), &[sample()]);
        assert!(
            table.starts_with("table inet warren_198_18_0_0_15 {}\ndelete table"),
            "{table}"
        );
        assert!(table.contains("ip saddr 198.18.0.0/15 ip daddr != 198.18.0.0/15 masquerade"));
        assert!(table.contains(&s));
    }

    #[test]
    fn ranges_are_checked_and_slots_handed_out_once() {
        assert!(parse_range("198.18.0.0/15").is_ok());
        for bad in ["198.18.0.1/15", "10.0.0.0/30", "fd00::/8", "nope"] {
            let e = parse_range(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
        let range: Ipv4Net = "10.9.0.0/29".parse().unwrap();
        let mut pool = Pool::default();
        assert_eq!(pool.take(range, "a").unwrap(), 0);
        assert_eq!(pool.take(range, "b").unwrap(), 1);
        assert!(matches!(
            pool.take(range, "c"),
            Err(EgressError::Full { .. })
        ));
        pool.release("a");
        assert_eq!(pool.take(range, "c").unwrap(), 0);
    }
}
