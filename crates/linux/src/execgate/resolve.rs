//! Path resolution as `execve` does it, inside a sandbox's root, in user space: which file a
//! path names, with every symlink followed and `..` never leaving the root. Pure: the file
//! system is reached through [`Lookup`], so the walk is unit-tested with a fake tree; the
//! supervisor's [`Lookup`] reads the target's root through `/proc/TID/root`.
//!
//! The walk keeps a stack of components that are known directories (symlinks are replaced by
//! their targets as they are met), so `..` is a plain pop, as in the kernel, and the result is
//! a canonical absolute path. It stops at the first component that does not exist: the rest
//! is kept lexically and the result says the file is missing.

use nix::errno::Errno;

/// The kernel's limit on symlinks followed in one lookup (`MAXSYMLINKS`).
pub const MAX_SYMLINKS: usize = 40;
/// Lookups one resolution may make (a path of 2,048 one-letter components through 40
/// symlinks could otherwise cost ~80,000): past it, `ELOOP`.
pub const MAX_LOOKUPS: usize = 4096;
/// The kernel's limit on a path's length, terminating NUL included (`PATH_MAX`).
pub const PATH_MAX: usize = 4096;

/// What a canonical absolute path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A symlink and its target (relative targets are relative to the link's directory).
    Link(String),
    Dir,
    /// A regular file or anything else that is not a directory.
    File,
    Missing,
}

/// The file system a path is resolved in. `path` is always absolute, canonical (no `.`, `..`
/// or symlinks in its directories) and relative to the sandbox's root.
pub trait Lookup {
    fn node(&mut self, path: &str) -> Result<Node, Errno>;
}

/// The file an exec would run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Every symlink followed: the file the kernel would load.
    pub path: String,
    /// The directories resolved, the last name as given (`/bin/sh` in a busybox image, whose
    /// `/bin/sh` is a symlink to `busybox`); equals `path` when the last name is no symlink.
    pub named: String,
    /// False when a component is missing (the exec would fail with `ENOENT`).
    pub exists: bool,
}

/// Resolves `path` (absolute, or relative to `base`, which is absolute) in `fs`.
pub fn resolve(fs: &mut impl Lookup, base: &str, path: &str) -> Result<Resolved, Errno> {
    if path.is_empty() {
        return Err(Errno::ENOENT);
    }
    if path.len() >= PATH_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    let mut dirs: Vec<String> = Vec::new();
    let mut todo: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    if !path.starts_with('/') {
        todo.extend(components(base));
    }
    todo.extend(components(path));
    let mut links = 0;
    let mut lookups = 0;
    let mut named = None;
    while let Some(name) = todo.pop_front() {
        match name.as_str() {
            "." => continue,
            ".." => {
                dirs.pop();
                continue;
            }
            _ => {}
        }
        dirs.push(name);
        lookups += 1;
        if lookups > MAX_LOOKUPS {
            return Err(Errno::ELOOP);
        }
        let here = join(&dirs);
        // The last name as the caller gave it, before its own symlink is followed.
        let last_given = todo.is_empty() && named.is_none();
        if last_given {
            named = Some(here.clone());
        }
        match fs.node(&here)? {
            Node::Dir => {}
            Node::File if todo.is_empty() => {}
            Node::File => return Err(Errno::ENOTDIR),
            Node::Missing => {
                // Nothing below exists; keep the rest as written, `..` applied lexically.
                for rest in todo {
                    match rest.as_str() {
                        "." => {}
                        ".." => {
                            dirs.pop();
                        }
                        _ => dirs.push(rest),
                    }
                }
                let path = join(&dirs);
                return Ok(Resolved {
                    named: named.unwrap_or_else(|| path.clone()),
                    path,
                    exists: false,
                });
            }
            Node::Link(target) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(Errno::ELOOP);
                }
                if target.is_empty() {
                    return Err(Errno::ENOENT);
                }
                dirs.pop();
                if target.starts_with('/') {
                    dirs.clear();
                }
                for (i, c) in components(&target).into_iter().enumerate() {
                    todo.insert(i, c);
                }
            }
        }
    }
    let path = join(&dirs);
    Ok(Resolved {
        named: named.unwrap_or_else(|| path.clone()),
        path,
        exists: true,
    })
}

fn components(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

fn join(dirs: &[String]) -> String {
    if dirs.is_empty() {
        return "/".to_string();
    }
    let mut s = String::with_capacity(dirs.iter().map(|d| d.len() + 1).sum());
    for d in dirs {
        s.push('/');
        s.push_str(d);
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A tree of paths; directories are implied by their children.
    struct Fake {
        nodes: HashMap<String, Node>,
        lookups: usize,
    }

    impl Fake {
        fn new(entries: &[(&str, Node)]) -> Fake {
            let mut nodes = HashMap::new();
            for (path, node) in entries {
                let mut dir = String::new();
                for c in components(path).iter().take(components(path).len() - 1) {
                    dir.push('/');
                    dir.push_str(c);
                    nodes.insert(dir.clone(), Node::Dir);
                }
                nodes.insert((*path).to_string(), node.clone());
            }
            Fake { nodes, lookups: 0 }
        }
    }

    impl Lookup for Fake {
        fn node(&mut self, path: &str) -> Result<Node, Errno> {
            self.lookups += 1;
            Ok(self.nodes.get(path).cloned().unwrap_or(Node::Missing))
        }
    }

    fn link(target: &str) -> Node {
        Node::Link(target.to_string())
    }

    fn busybox() -> Fake {
        Fake::new(&[
            ("/bin/busybox", Node::File),
            ("/bin/sh", link("busybox")),
            ("/usr/bin/env", link("/bin/busybox")),
            ("/lib", link("usr/lib")),
            ("/usr/lib/tool", Node::File),
            ("/tmp/other", Node::File),
            ("/tmp/up", link("../../../tmp/other")),
            ("/tmp/loop", link("loop")),
            ("/tmp/dirlink", link("/usr")),
            ("/proc/7/exe", link("/bin/busybox")),
            ("/proc/self", link("7")),
        ])
    }

    fn ok(fs: &mut Fake, base: &str, path: &str) -> (String, String, bool) {
        let r = resolve(fs, base, path).unwrap();
        (r.path, r.named, r.exists)
    }

    #[test]
    fn absolute_paths_and_symlinks_resolve_to_the_file() {
        let mut fs = busybox();
        assert_eq!(
            ok(&mut fs, "/", "/bin/busybox"),
            ("/bin/busybox".into(), "/bin/busybox".into(), true)
        );
        // A relative link resolves in the link's directory; `named` keeps the name given.
        assert_eq!(
            ok(&mut fs, "/", "/bin/sh"),
            ("/bin/busybox".into(), "/bin/sh".into(), true)
        );
        assert_eq!(ok(&mut fs, "/", "/usr/bin/env").0, "/bin/busybox");
        // A symlinked directory: `named` has its directory resolved.
        assert_eq!(
            ok(&mut fs, "/", "/lib/tool"),
            ("/usr/lib/tool".into(), "/usr/lib/tool".into(), true)
        );
        assert_eq!(ok(&mut fs, "/", "/tmp/dirlink/lib/tool").0, "/usr/lib/tool");
        assert_eq!(ok(&mut fs, "/", "//bin///./busybox").0, "/bin/busybox");
        // The busybox shell's applets: /proc/self/exe.
        assert_eq!(ok(&mut fs, "/", "/proc/self/exe").0, "/bin/busybox");
    }

    #[test]
    fn relative_paths_start_at_the_base_and_dotdot_never_leaves_the_root() {
        let mut fs = busybox();
        assert_eq!(ok(&mut fs, "/tmp", "other").0, "/tmp/other");
        assert_eq!(ok(&mut fs, "/tmp", "./other").0, "/tmp/other");
        assert_eq!(ok(&mut fs, "/bin", "../tmp/other").0, "/tmp/other");
        assert_eq!(ok(&mut fs, "/", "/../../../tmp/other").0, "/tmp/other");
        // A symlink climbing above the root stays in it (RESOLVE_IN_ROOT).
        assert_eq!(ok(&mut fs, "/", "/tmp/up").0, "/tmp/other");
        // `..` after a symlinked directory leaves its target, not the link's directory.
        assert_eq!(ok(&mut fs, "/", "/lib/../lib/tool").0, "/usr/lib/tool");
        assert_eq!(
            ok(&mut fs, "/", "/tmp/dirlink/../tmp/other").0,
            "/tmp/other"
        );
    }

    #[test]
    fn missing_files_loops_and_bad_paths() {
        let mut fs = busybox();
        assert_eq!(
            ok(&mut fs, "/", "/nope/x/../y"),
            ("/nope/y".into(), "/nope/y".into(), false)
        );
        assert!(!ok(&mut fs, "/usr/local/bin", "python3").2);
        assert_eq!(resolve(&mut fs, "/", "/tmp/loop"), Err(Errno::ELOOP));
        assert_eq!(resolve(&mut fs, "/", "/bin/busybox/x"), Err(Errno::ENOTDIR));
        assert_eq!(resolve(&mut fs, "/", ""), Err(Errno::ENOENT));
        let long = format!("/{}", "a".repeat(PATH_MAX));
        assert_eq!(resolve(&mut fs, "/", &long), Err(Errno::ENAMETOOLONG));
    }

    #[test]
    fn work_is_bounded_by_the_symlink_limit() {
        // A chain of links that each add components cannot make the walk unbounded.
        let mut entries = Vec::new();
        for i in 0..100 {
            entries.push((format!("/l{i}"), link(&format!("/d/../l{}", i + 1))));
        }
        entries.push(("/d".to_string(), Node::Dir));
        let refs: Vec<(&str, Node)> = entries
            .iter()
            .map(|(p, n)| (p.as_str(), n.clone()))
            .collect();
        let mut fs = Fake::new(&refs);
        assert_eq!(resolve(&mut fs, "/", "/l0"), Err(Errno::ELOOP));
        assert!(fs.lookups < 200, "{} lookups", fs.lookups);
    }

    #[test]
    fn globs_match_as_the_policy_says() {
        let allow = warren_spec::GlobList::new(
            "policy.exec.allow",
            &["/bin/*".to_string(), "/opt/**".to_string()],
        )
        .unwrap();
        assert!(allow.is_match("/bin/busybox"));
        assert!(!allow.is_match("/bin/sub/busybox"));
        assert!(allow.is_match("/opt/a/b/c"));
        assert!(!allow.is_match("/tmp/other"));
        let bad = warren_spec::GlobList::new("policy.exec.allow", &["[a".to_string()]).unwrap_err();
        assert!(
            bad[0].to_string().contains("policy.exec.allow[0]"),
            "{}",
            bad[0]
        );
    }
}
