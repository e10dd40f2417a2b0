//! `warren-supervise`: the linux backend's per-sandbox supervisor and exec helper (see
//! `warren_linux::supervisor`). Started by the server, not by hand. A binary of its own
//! (rather than only `warren __supervise`) because it is small: it starts in a fraction of
//! the time the full `warren` binary takes to load.

fn main() {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    std::process::exit(warren_linux::supervisor::cli(&args));
}
