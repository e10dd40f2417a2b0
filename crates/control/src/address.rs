//! Where a server listens and a client connects: `unix:///path` or `tcp://host:port`, and the
//! defaults both sides agree on.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The gRPC API's TCP port when an address gives none (seed 004's fast path).
pub const DEFAULT_TCP_PORT: u16 = 9090;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

impl FromStr for Address {
    type Err = String;

    /// `unix:///run/warren.sock`, `/run/warren.sock`, `tcp://127.0.0.1:9090`,
    /// `http://127.0.0.1:9090`, `127.0.0.1:9090`, or `tcp://HOST` (port 9090).
    fn from_str(s: &str) -> Result<Self, String> {
        let unix = |p: &str| {
            if p.is_empty() {
                Err(format!(
                    "{s:?} has no socket path (expected unix:///path/to.sock)"
                ))
            } else {
                Ok(Address::Unix(PathBuf::from(p)))
            }
        };
        let tcp = |hp: &str| match hp.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && !hp.ends_with(']') => {
                match port.parse::<u16>() {
                    Ok(_) => Ok(Address::Tcp(hp.to_string())),
                    Err(_) => Err(format!(
                        "{s:?}: {port:?} is not a port (expected e.g. tcp://127.0.0.1:9090)"
                    )),
                }
            }
            // No port: the gRPC API's default, seed 004's 9090.
            _ if !hp.is_empty() && !hp.contains('/') => {
                Ok(Address::Tcp(format!("{hp}:{DEFAULT_TCP_PORT}")))
            }
            _ => Err(format!(
                "{s:?} is not host:port (expected e.g. tcp://127.0.0.1:9090)"
            )),
        };
        if let Some(p) = s.strip_prefix("unix://") {
            unix(p)
        } else if let Some(p) = s.strip_prefix("unix:") {
            unix(p)
        } else if let Some(hp) = s
            .strip_prefix("tcp://")
            .or_else(|| s.strip_prefix("http://"))
        {
            tcp(hp.trim_end_matches('/'))
        } else if s.starts_with('/') || s.starts_with('.') {
            unix(s)
        } else if s.contains("://") {
            Err(format!(
                "{s:?}: unknown scheme (expected unix:// or tcp://)"
            ))
        } else if s.contains(':') {
            tcp(s)
        } else {
            Err(format!(
                "{s:?} is not an address (expected unix:///path.sock, tcp://host[:port] or host:port)"
            ))
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix://{}", p.display()),
            Address::Tcp(hp) => write!(f, "tcp://{hp}"),
        }
    }
}

fn is_root() -> bool {
    // The owner of /proc/self is the process's effective uid; no unsafe geteuid needed.
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

/// `/run/warren/warren.sock` for root, `$XDG_RUNTIME_DIR/warren/warren.sock` or
/// `/tmp/warren-$UID/warren.sock` otherwise.
pub fn default_socket() -> PathBuf {
    if is_root() {
        return PathBuf::from("/run/warren/warren.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => Path::new(&d).join("warren").join("warren.sock"),
        _ => PathBuf::from(format!("/tmp/warren-{}", uid())).join("warren.sock"),
    }
}

/// `/var/lib/warren` for root, `$XDG_DATA_HOME/warren` or `~/.local/share/warren` otherwise.
pub fn default_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/warren");
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Path::new(&d).join("warren");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    Path::new(&home).join(".local/share/warren")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let unix = |p: &str| Address::Unix(PathBuf::from(p));
        assert_eq!("unix:///run/w.sock".parse(), Ok(unix("/run/w.sock")));
        assert_eq!("unix:rel.sock".parse(), Ok(unix("rel.sock")));
        assert_eq!("/run/w.sock".parse(), Ok(unix("/run/w.sock")));
        assert_eq!(
            "tcp://127.0.0.1:9090".parse(),
            Ok(Address::Tcp("127.0.0.1:9090".into()))
        );
        assert_eq!(
            "http://[::1]:9090/".parse(),
            Ok(Address::Tcp("[::1]:9090".into()))
        );
        assert_eq!(
            "localhost:0".parse(),
            Ok(Address::Tcp("localhost:0".into()))
        );
        assert_eq!(
            "tcp://nohost".parse(),
            Ok(Address::Tcp("nohost:9090".into())),
            "TCP without a port is the default 9090"
        );
        assert_eq!("tcp://[::1]".parse(), Ok(Address::Tcp("[::1]:9090".into())));
        for bad in [
            "unix://",
            "tcp://",
            "tcp://h:99999",
            "tcp://h:port",
            "grpc://x:1",
            "justaname",
        ] {
            let e = bad.parse::<Address>().expect_err(bad);
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        assert_eq!(unix("/a.sock").to_string(), "unix:///a.sock");
    }
}
