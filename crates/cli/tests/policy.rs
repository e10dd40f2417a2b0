//! Policies end to end: the real `warren server` and CLI (docs/policy.md).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use common::{TestServer, json, read, stderr};

const STRICT: &str = r#"
apiVersion: warren.dev/v1
kind: Policy
metadata:
  name: strict
spec:
  network:
    mode: none
  filesystem:
    writable: [/tmp]
  resources:
    maxCpu: "1"
    maxMemory: 256Mi
  maxLifetimeSeconds: 60
"#;

const BAD_SANDBOX: &str = r#"
apiVersion: warren.dev/v1
kind: Sandbox
metadata:
  name: greedy
spec:
  policy: strict
  ports: [{containerPort: 8080}]
  mounts: [{guest: /etc, host: /srv}]
  resources:
    limits: {cpu: "2", memory: 1Gi}
"#;

const GOOD_SANDBOX: &str = r#"
apiVersion: warren.dev/v1
kind: Sandbox
metadata:
  name: modest
spec:
  policy: strict
  timeoutSeconds: 30
  resources:
    limits: {cpu: 500m, memory: 128Mi}
"#;

fn file(server: &TestServer, name: &str, text: &str) -> String {
    let path: PathBuf = server.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

const VIOLATIONS: [&str; 5] = [
    r#"  spec.ports[0].containerPort: "8080" violates network.mode none (no ports)"#,
    r#"  spec.mounts[0].guest: "/etc" violates filesystem (not under writable ["/tmp"] or readOnly [])"#,
    r#"  spec.resources.limits.cpu: "2" violates resources.maxCpu (a limit of at most "1" is required)"#,
    r#"  spec.resources.limits.memory: "1Gi" violates resources.maxMemory (a limit of at most "256Mi" is required)"#,
    r#"  spec.timeoutSeconds: "<unset>" violates maxLifetimeSeconds (timeoutSeconds of at most 60 is required)"#,
];

#[test]
fn check_prints_every_violation_and_exits_1() {
    let server = TestServer::start();
    let policy = file(&server, "strict.yaml", STRICT);
    assert_eq!(
        server.ok(&["policy", "apply", "-f", &policy]),
        "policy strict created\n"
    );
    let bad = file(&server, "bad.yaml", BAD_SANDBOX);
    let out = server.warren(&["policy", "check", "-f", &bad]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut want = vec![r#"sandbox greedy: 5 violations of policy strict (enforce)"#];
    want.extend(VIOLATIONS);
    assert_eq!(text.lines().collect::<Vec<_>>(), want);

    // The same against a policy file that is not stored, and a good spec: admitted, exit 0.
    let good = file(&server, "good.yaml", GOOD_SANDBOX);
    let out = server.ok(&["policy", "check", "-f", &good, "--policy-file", &policy]);
    assert_eq!(out, "sandbox modest: admitted by policy inline\n");
    let out = server.ok(&["policy", "check", "-f", &good]);
    assert_eq!(out, "sandbox modest: admitted by policy strict\n");

    // Nothing was created.
    assert_eq!(server.ok(&["ls", "-o", "name"]), "");
    // An unknown policy is an error naming it.
    let out = server.warren(&["policy", "check", "-f", &good, "--policy", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(r#"policy "nope" not found"#),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_server_refuses_a_violating_create_and_records_the_decision() {
    let server = TestServer::start();
    server.ok(&["policy", "apply", "-f", &file(&server, "p.yaml", STRICT)]);
    let out = server.warren(&["apply", "-f", &file(&server, "bad.yaml", BAD_SANDBOX)]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(r#"sandbox "greedy" is refused by policy "strict":"#),
        "{err}"
    );
    for v in VIOLATIONS {
        assert!(err.contains(v.trim()), "missing {v:?} in:\n{err}");
    }
    assert_eq!(server.ok(&["ls", "-o", "name"]), "");

    // `run --policy` over the flags: refused too.
    let out = server.warren(&["run", "--name", "r", "--policy", "strict"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("spec.timeoutSeconds"),
        "{}",
        stderr(&out)
    );

    // Admitted: the decision is in the status and in policy.json beside resources.json.
    server.ok(&["apply", "-f", &file(&server, "good.yaml", GOOD_SANDBOX)]);
    let obj = json(&server.ok(&["get", "modest", "-o", "json"]));
    assert_eq!(obj["status"]["policy"]["policy"], "strict");
    assert_eq!(obj["status"]["policy"]["verdict"], "admitted");
    let info = &obj["status"]["backendInfo"];
    assert_eq!(info["policy_decision"], "admitted");
    let decision = json(&read(&PathBuf::from(info["policy_path"].as_str().unwrap())));
    assert_eq!(decision["admitted"], true);
    assert_eq!(decision["policy"], "strict");

    // An update that breaks the policy is refused the same way.
    let out = server.warren(&["update", "modest", "--memory", "1Gi"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out)
            .contains(r#"spec.resources.limits.memory: "1Gi" violates resources.maxMemory"#),
        "{}",
        stderr(&out)
    );

    // A held policy cannot be deleted; the message names the sandbox.
    let out = server.warren(&["policy", "rm", "strict"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(r#"policy "strict" is held by sandboxes modest"#),
        "{}",
        stderr(&out)
    );
    server.ok(&["rm", "modest"]);
    assert_eq!(
        server.ok(&["policy", "rm", "strict"]),
        "policy strict deleted\n"
    );
}

#[test]
fn apply_ls_get_rm_round_trip_survives_a_restart() {
    let mut server = TestServer::start();
    let path = file(&server, "p.yaml", STRICT);
    assert_eq!(
        server.ok(&["policy", "apply", "-f", &path]),
        "policy strict created\n"
    );
    assert_eq!(
        server.ok(&["policy", "apply", "-f", &path]),
        "policy strict unchanged\n"
    );
    let ls = server.ok(&["policy", "ls"]);
    assert!(ls.starts_with("NAME"), "{ls}");
    assert!(ls.lines().nth(1).unwrap().starts_with("strict "), "{ls}");

    // get -o yaml prints what apply takes back.
    let got = server.ok(&["policy", "get", "strict"]);
    let again = file(&server, "again.yaml", &got);
    assert_eq!(
        server.ok(&["policy", "apply", "-f", &again]),
        "policy strict unchanged\n"
    );
    let obj = json(&server.ok(&["policy", "get", "strict", "-o", "json"]));
    assert_eq!(obj["spec"]["resources"]["maxMemory"], "256Mi");
    assert_eq!(obj["metadata"]["resourceVersion"], "1");
    let hash = obj["status"]["hash"].as_str().unwrap().to_string();

    server.terminate();
    server.spawn();
    let obj = json(&server.ok(&["policy", "get", "strict", "-o", "json"]));
    assert_eq!(
        obj["status"]["hash"],
        hash.as_str(),
        "kept across a restart"
    );

    let changed = STRICT.replace("256Mi", "512Mi");
    let path = file(&server, "p2.yaml", &changed);
    assert_eq!(
        server.ok(&["policy", "apply", "-f", &path]),
        "policy strict configured\n"
    );
    let obj = json(&server.ok(&["policy", "get", "strict", "-o", "json"]));
    assert_eq!(obj["metadata"]["resourceVersion"], "2");

    assert_eq!(
        server.ok(&["policy", "rm", "strict"]),
        "policy strict deleted\n"
    );
    let out = server.warren(&["policy", "get", "strict"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(r#"policy "strict" not found"#));
    server.terminate();
    server.spawn();
    assert!(
        !server
            .ok(&["policy", "ls", "-o", "json"])
            .contains("strict")
    );

    // Errors name the field and the value.
    let bad = STRICT.replace(
        "mode: none",
        "mode: egress\n    egress: [{cidr: 10.0.0.1/33}]",
    );
    let out = server.warren(&["policy", "apply", "-f", &file(&server, "bad.yaml", &bad)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(r#"spec.network.egress[0].cidr: "10.0.0.1/33" is not a CIDR"#),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_default_policy_applies_to_sandboxes_that_name_none() {
    let server = TestServer::start();
    // No policy named `default`: nothing applies.
    server.ok(&["run", "--name", "free"]);
    let dflt = STRICT.replace("name: strict", "name: default");
    server.ok(&["policy", "apply", "-f", &file(&server, "d.yaml", &dflt)]);
    let out = server.warren(&["run", "--name", "capped"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(r#"refused by policy "default""#),
        "{}",
        stderr(&out)
    );
    server.ok(&[
        "run",
        "--name",
        "ok",
        "--timeout",
        "30s",
        "--cpu",
        "1",
        "--memory",
        "64Mi",
    ]);
    let obj = json(&server.ok(&["get", "ok", "-o", "json"]));
    assert_eq!(obj["status"]["policy"]["policy"], "default");

    // --default-policy names another policy, which must exist.
    let named = TestServer::start_with(&["--default-policy", "house"], None);
    let out = named.warren(&["run", "--name", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out)
            .contains(r#"policy "house" (named by the server's --default-policy) does not exist"#),
        "{}",
        stderr(&out)
    );
    let house = STRICT.replace("name: strict", "name: house");
    named.ok(&["policy", "apply", "-f", &file(&named, "h.yaml", &house)]);
    let ls = named.ok(&["policy", "ls"]);
    assert!(ls.contains("house (default)"), "{ls}");
    let out = named.warren(&["run", "--name", "x"]);
    assert!(
        stderr(&out).contains(r#"refused by policy "house""#),
        "{}",
        stderr(&out)
    );
}
