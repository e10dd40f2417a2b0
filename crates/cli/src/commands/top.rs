//! `warren top NAME`: the processes running in a sandbox, as `docker top` shows them: each
//! one's pid inside the sandbox and on the node, user, state, resident memory, CPU time and
//! command line. linux lists every process in the sandbox's cgroup; vm, every process of the
//! workload's and of `exec` in the guest, with the guest's pids (no host pid: `-`); slot and
//! wasm have no list (the server answers UNIMPLEMENTED, and the error says so).

use std::process::ExitCode;

use serde_json::json;
use warren_proto::v1;
use warren_spec::format_bytes;

use super::{Globals, answer, named_error};
use crate::output;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sandbox name.
    name: String,
    /// Output: table or json (an array of processes).
    #[arg(short, long, value_enum, default_value = "table")]
    output: TopFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TopFormat {
    Table,
    Json,
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    let mut client = g.connect().await?;
    let req = v1::ListProcessesRequest {
        name: args.name.clone(),
    };
    let list = match answer(client.list_processes(req).await) {
        Ok(list) => list,
        Err(e) => {
            eprintln!("error: {}", named_error(&args.name, &e));
            return Ok(ExitCode::from(1));
        }
    };
    match args.output {
        TopFormat::Json => {
            let all: Vec<_> = list
                .processes
                .iter()
                .map(|p| {
                    json!({
                        "pid": p.pid,
                        "sandboxPid": p.sandbox_pid,
                        "ppid": p.ppid,
                        "uid": p.uid,
                        "state": p.state,
                        "cpuNs": p.cpu_ns,
                        "rssBytes": p.rss_bytes,
                        "command": p.command,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&all)?);
        }
        TopFormat::Table => {
            let rows: Vec<Vec<String>> = list
                .processes
                .iter()
                .map(|p| row(p, &list.processes))
                .collect();
            output::table(
                &[
                    "PID", "HOST PID", "PPID", "UID", "STATE", "RSS", "TIME", "COMMAND",
                ],
                &rows,
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One process's line. Its pid and its parent's are the sandbox's own, as `ps` inside it
/// shows them (a parent outside the sandbox, the init's, is 0); the host's pid beside them.
fn row(p: &v1::Process, all: &[v1::Process]) -> Vec<String> {
    let ppid = match p.sandbox_pid {
        // The pids are the sandbox's already (a VM's guest): its parent's is too, listed
        // or not (the guest's PID 1 is not).
        None => p.ppid,
        Some(_) => all
            .iter()
            .find(|q| q.pid == p.ppid)
            .map_or(0, |parent| parent.sandbox_pid.unwrap_or(parent.pid)),
    };
    vec![
        p.sandbox_pid.unwrap_or(p.pid).to_string(),
        // Without a pid of the sandbox's own, the pid is already the sandbox's (a VM's
        // guest): no host process stands for it.
        p.sandbox_pid.map_or("-".to_string(), |_| p.pid.to_string()),
        ppid.to_string(),
        p.uid.to_string(),
        p.state.clone(),
        format_bytes(p.rss_bytes),
        cpu_time(p.cpu_ns),
        p.command.clone(),
    ]
}

/// CPU time as `ps` shows it: `M:SS.cc`, hours first past an hour.
fn cpu_time(ns: u64) -> String {
    let centis = ns / 10_000_000;
    let (secs, cs) = (centis / 100, centis % 100);
    let (mins, s) = (secs / 60, secs % 60);
    if mins >= 60 {
        format!("{}:{:02}:{s:02}", mins / 60, mins % 60)
    } else {
        format!("{mins}:{s:02}.{cs:02}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_reads_as_ps_shows_it() {
        assert_eq!(cpu_time(0), "0:00.00");
        assert_eq!(cpu_time(1_234_000_000), "0:01.23");
        assert_eq!(cpu_time(61_500_000_000), "1:01.50");
        assert_eq!(cpu_time(3_723_000_000_000), "1:02:03");
    }

    #[test]
    fn a_row_shows_the_sandboxs_pids_first_and_the_host_pid_beside_them() {
        let init = v1::Process {
            pid: 4242,
            sandbox_pid: Some(1),
            ppid: 4200,
            uid: 0,
            state: "S".into(),
            cpu_ns: 20_000_000,
            rss_bytes: 1 << 20,
            command: "sh".into(),
        };
        let child = v1::Process {
            pid: 4250,
            sandbox_pid: Some(7),
            ppid: 4242,
            command: "sleep 600".into(),
            ..init.clone()
        };
        let all = [init.clone(), child.clone()];
        // The init's parent is outside the sandbox: 0, as `ps` inside shows it.
        let size = format_bytes(1 << 20);
        assert_eq!(
            row(&init, &all),
            ["1", "4242", "0", "0", "S", size.as_str(), "0:00.02", "sh"]
        );
        assert_eq!(row(&child, &all)[..3], ["7", "4250", "1"]);
        // A VM's processes have the guest's pids only: no host pid stands for them, and
        // their parent's pid is the guest's too, whether listed or not (its PID 1 is not).
        let workload = v1::Process {
            pid: 180,
            sandbox_pid: None,
            ppid: 1,
            ..child
        };
        let exec = v1::Process {
            pid: 191,
            ppid: 180,
            ..workload.clone()
        };
        let guest = [workload.clone(), exec.clone()];
        assert_eq!(row(&workload, &guest)[..3], ["180", "-", "1"]);
        assert_eq!(row(&exec, &guest)[..3], ["191", "-", "180"]);
    }
}
