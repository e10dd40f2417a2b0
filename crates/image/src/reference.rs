//! Image names and digests: parsing, validation and normalization.
//!
//! Names are stored in Docker's "familiar" form so that `busybox`, `busybox:latest` and
//! `docker.io/library/busybox:latest` are one name (`busybox:latest`), while a name on another
//! registry keeps its domain (`127.0.0.1:5000/busybox:latest`).

use crate::error::ImageError;

const DOCKER_DOMAIN: &str = "docker.io";
const DEFAULT_TAG: &str = "latest";

/// A parsed image reference: `[domain/]path[:tag][@digest]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reference {
    pub domain: String,
    pub path: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl Reference {
    pub fn parse(input: &str) -> Result<Reference, ImageError> {
        let invalid = |reason: &str| ImageError::InvalidName {
            name: input.to_string(),
            reason: reason.to_string(),
        };
        if input.is_empty() {
            return Err(invalid("it is empty"));
        }
        if input.len() > 512 {
            return Err(invalid("it is longer than 512 characters"));
        }
        if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid("it contains whitespace or control characters"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((rest, digest)) => (rest, Some(Digest::parse(digest)?)),
            None => (input, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &rest[last_slash + i + 1..];
                if !is_tag(tag) {
                    return Err(invalid(&format!(
                        "tag \"{tag}\" must be 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'"
                    )));
                }
                (&rest[..last_slash + i], Some(tag.to_string()))
            }
            None => (rest, None),
        };
        if name.len() > NAME_MAX {
            return Err(invalid(&format!(
                "the repository is longer than {NAME_MAX} characters"
            )));
        }
        let mut components: Vec<&str> = name.split('/').collect();
        let domain = if components.len() > 1 && is_domain(components[0]) {
            let domain = components.remove(0);
            if !is_host_port(domain) {
                return Err(invalid(&format!(
                    "registry \"{domain}\" is not a host[:port] (letters, digits and inner \
                     '-', in components separated by '.', or an [IPv6] address; a port of digits)"
                )));
            }
            match domain {
                "index.docker.io" | "registry-1.docker.io" => DOCKER_DOMAIN.to_string(),
                other => other.to_string(),
            }
        } else {
            DOCKER_DOMAIN.to_string()
        };
        for component in &components {
            if !is_path_component(component) {
                return Err(invalid(&format!(
                    "repository component \"{component}\" must be lowercase letters and digits, \
                     separated by '.', '_', '__' or '-'"
                )));
            }
        }
        let mut path = components.join("/");
        if domain == DOCKER_DOMAIN && components.len() == 1 {
            path = format!("library/{path}");
        }
        Ok(Reference {
            domain,
            path,
            tag,
            digest,
        })
    }

    /// The repository in familiar form (`busybox`, `user/app`, `127.0.0.1:5000/busybox`).
    pub fn familiar_repository(&self) -> String {
        if self.domain == DOCKER_DOMAIN {
            match self.path.strip_prefix("library/") {
                Some(short) if !short.contains('/') => short.to_string(),
                _ => self.path.clone(),
            }
        } else {
            format!("{}/{}", self.domain, self.path)
        }
    }

    fn suffix(&self) -> String {
        let mut out = String::new();
        match (&self.tag, &self.digest) {
            (Some(tag), _) => {
                out.push(':');
                out.push_str(tag);
            }
            (None, None) => {
                out.push(':');
                out.push_str(DEFAULT_TAG);
            }
            (None, Some(_)) => {}
        }
        if let Some(digest) = &self.digest {
            out.push('@');
            out.push_str(digest.as_str());
        }
        out
    }

    /// The name as stored: familiar repository plus tag (default `latest`) and digest.
    pub fn familiar(&self) -> String {
        format!("{}{}", self.familiar_repository(), self.suffix())
    }

    /// The fully qualified reference a registry client needs (`docker.io/library/busybox:latest`).
    pub fn full(&self) -> String {
        format!("{}/{}{}", self.domain, self.path, self.suffix())
    }
}

/// Normalizes an image name to the form the store keeps: `busybox` -> `busybox:latest`,
/// `docker.io/library/busybox` -> `busybox:latest`, `127.0.0.1:5000/x` -> `127.0.0.1:5000/x:latest`.
pub fn normalize_name(name: &str) -> Result<String, ImageError> {
    Ok(Reference::parse(name)?.familiar())
}

/// The longest repository (registry and path, as written), as distribution's
/// `NameTotalLengthMax`.
const NAME_MAX: usize = 255;

/// Whether the first of several components names a registry (distribution's
/// `splitDockerDomain`); [`is_host_port`] then checks it, so `..` is refused, not a host.
fn is_domain(component: &str) -> bool {
    component.contains('.')
        || component.contains(':')
        || component == "localhost"
        || component.chars().any(|c| c.is_ascii_uppercase())
}

/// `host[:port]` as the distribution reference grammar has it: `host` is domain components
/// (`[a-zA-Z0-9]` with inner `-`) separated by single dots, or an IPv6 address in brackets;
/// `port` is digits.
fn is_host_port(domain: &str) -> bool {
    let (host, port) = match domain.find(']') {
        Some(end) if domain.starts_with('[') => domain.split_at(end + 1),
        _ => domain.split_at(domain.find(':').unwrap_or(domain.len())),
    };
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(ip) => !ip.is_empty() && ip.chars().all(|c| c.is_ascii_hexdigit() || c == ':'),
        None => host.split('.').all(|c| {
            !c.is_empty()
                && !c.starts_with('-')
                && !c.ends_with('-')
                && c.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        }),
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    host_ok && port_ok
}

pub(crate) fn is_tag(tag: &str) -> bool {
    let mut chars = tag.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() || c == '_' => {}
        _ => return false,
    }
    tag.len() <= 128 && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn is_path_component(component: &str) -> bool {
    // [a-z0-9]+ ((\.|_|__|-+)[a-z0-9]+)*
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// A validated `sha256:<64 lowercase hex>` digest. Its hex is safe to use as a file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Digest(String);

impl Digest {
    pub fn parse(digest: &str) -> Result<Digest, ImageError> {
        let invalid = |reason: &str| ImageError::InvalidDigest {
            digest: digest.to_string(),
            reason: reason.to_string(),
        };
        let Some((algorithm, hex)) = digest.split_once(':') else {
            return Err(invalid("expected \"sha256:<64 hex digits>\""));
        };
        if algorithm != "sha256" {
            return Err(invalid(&format!(
                "algorithm \"{algorithm}\" is not supported (only sha256)"
            )));
        }
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(invalid(
                "expected 64 lowercase hex digits after \"sha256:\"",
            ));
        }
        Ok(Digest(digest.to_string()))
    }

    pub fn from_hex(hex: &str) -> Result<Digest, ImageError> {
        Digest::parse(&format!("sha256:{hex}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn familiar(s: &str) -> String {
        normalize_name(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn familiar_names() {
        assert_eq!(familiar("busybox"), "busybox:latest");
        assert_eq!(familiar("busybox:1.36"), "busybox:1.36");
        assert_eq!(familiar("docker.io/library/busybox"), "busybox:latest");
        assert_eq!(familiar("index.docker.io/library/busybox:x"), "busybox:x");
        assert_eq!(familiar("docker.io/user/app"), "user/app:latest");
        assert_eq!(familiar("user/app:v1"), "user/app:v1");
        assert_eq!(familiar("localhost/app"), "localhost/app:latest");
        assert_eq!(
            familiar("127.0.0.1:5000/busybox:t1"),
            "127.0.0.1:5000/busybox:t1"
        );
        assert_eq!(familiar("quay.io/a/b/c:v"), "quay.io/a/b/c:v");
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(familiar(&format!("busybox@{d}")), format!("busybox@{d}"));
        assert_eq!(
            familiar(&format!("busybox:1@{d}")),
            format!("busybox:1@{d}")
        );
    }

    #[test]
    fn full_references() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.full(), "docker.io/library/busybox:latest");
        let r = Reference::parse("127.0.0.1:5000/busybox:t").unwrap();
        assert_eq!(r.full(), "127.0.0.1:5000/busybox:t");
    }

    #[test]
    fn invalid_names() {
        for bad in [
            "",
            "Busybox",
            "busy box",
            "a//b",
            "a:",
            "a:-x",
            "-a",
            "a/",
            "x@sha256:12",
        ] {
            let err = normalize_name(bad).expect_err(bad).to_string();
            assert!(err.contains("invalid"), "{bad}: {err}");
        }
        let err = normalize_name("Busybox").unwrap_err().to_string();
        assert!(err.contains("\"Busybox\""), "{err}");
    }

    #[test]
    fn registries_follow_the_reference_grammar() {
        for good in [
            "localhost:5000/x",
            "my-registry.example/a/b",
            "Registry.Example/x",
            "[::1]:5000/x",
            "[fe80::1]/x",
            "127.0.0.1/x",
        ] {
            assert_eq!(familiar(good), format!("{good}:latest"));
        }
        for bad in [
            "../x",
            "./x",
            ".../x",
            "a..b/x",
            ".example.com/x",
            "example.com./x",
            "-a.example/x",
            "a-.example/x",
            "a_b.example/x",
            "example.com:/x",
            "example.com:50a/x",
            "example.com:1:2/x",
            "[::1/x",
            "[]:5000/x",
            "[::1]5000/x",
            "[::g]/x",
        ] {
            let err = normalize_name(bad).expect_err(bad).to_string();
            let registry = bad.split('/').next().unwrap_or_default();
            assert!(
                err.contains(&format!("registry \"{registry}\" is not a host[:port]")),
                "{bad}: {err}"
            );
        }
        // Dots alone are no path component either.
        for bad in [".", "..", "x/..", "x/./y", "x/.../y", "x/a..b"] {
            let err = normalize_name(bad).expect_err(bad).to_string();
            assert!(err.contains("repository component"), "{bad}: {err}");
        }
        let long = format!("a/{}", "b".repeat(254));
        let err = normalize_name(&long).expect_err("too long").to_string();
        assert!(err.contains("longer than 255"), "{err}");
        normalize_name(&long[..255]).expect("255 characters");
    }

    #[test]
    fn digests() {
        let hex = "0123456789abcdef".repeat(4);
        assert_eq!(Digest::from_hex(&hex).unwrap().hex(), hex);
        for bad in [
            "sha256:../../etc".to_string(),
            format!("sha512:{hex}"),
            format!("sha256:{}", hex.to_uppercase()),
            hex.clone(),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad}");
        }
    }
}
