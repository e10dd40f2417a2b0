//! `warren server --store`: which store, where.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// `redb:PATH` (the embedded default, `<dir>/state.redb` when no path is given) or
/// `etcd://host:port[,host:port...]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StoreUrl {
    /// `None`: `<dir>/state.redb`.
    #[default]
    Redb,
    RedbAt(PathBuf),
    /// `host:port` endpoints, at least one.
    Etcd(Vec<String>),
}

impl FromStr for StoreUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "redb" {
            return Ok(StoreUrl::Redb);
        }
        if let Some(path) = s
            .strip_prefix("redb://")
            .or_else(|| s.strip_prefix("redb:"))
        {
            if path.is_empty() {
                return Err(format!(
                    "{s:?} has no path (expected redb:/var/lib/warren/state.redb)"
                ));
            }
            return Ok(StoreUrl::RedbAt(PathBuf::from(path)));
        }
        let Some(list) = s.strip_prefix("etcd://") else {
            return Err(format!(
                "{s:?} is not a store (expected etcd://host:port[,host:port...] or redb:PATH)"
            ));
        };
        let mut endpoints = Vec::new();
        for endpoint in list.trim_end_matches('/').split(',') {
            let endpoint = endpoint.trim();
            match endpoint.rsplit_once(':') {
                Some((host, port))
                    if !host.is_empty()
                        && !host.contains('/')
                        && port.parse::<u16>().is_ok_and(|p| p != 0) =>
                {
                    endpoints.push(endpoint.to_string())
                }
                _ => {
                    return Err(format!(
                        "{s:?}: endpoint {endpoint:?} is not host:port (expected e.g. etcd://127.0.0.1:2379)"
                    ));
                }
            }
        }
        Ok(StoreUrl::Etcd(endpoints))
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Redb => f.write_str("redb"),
            StoreUrl::RedbAt(p) => write!(f, "redb:{}", p.display()),
            StoreUrl::Etcd(e) => write!(f, "etcd://{}", e.join(",")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_the_value_in_errors() {
        assert_eq!("redb".parse(), Ok(StoreUrl::Redb));
        assert_eq!(
            "redb:/x/state.redb".parse(),
            Ok(StoreUrl::RedbAt("/x/state.redb".into()))
        );
        assert_eq!(
            "etcd://127.0.0.1:2379,[::1]:2380".parse(),
            Ok(StoreUrl::Etcd(vec![
                "127.0.0.1:2379".into(),
                "[::1]:2380".into()
            ]))
        );
        let url = StoreUrl::Etcd(vec!["a:1".into(), "b:2".into()]);
        assert_eq!(url.to_string().parse(), Ok(url));
        for bad in [
            "etcd://",
            "etcd://host",
            "etcd://h:0",
            "etcd://h:1,",
            "etcd://h:99999",
            "redb:",
            "mysql://x:1",
            "/var/lib/x",
        ] {
            let e = bad.parse::<StoreUrl>().expect_err(bad);
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }
}
