//! Writes an OCI image layout of Debian's static busybox (`/bin/busybox`) into DIR, named
//! NAME (default `busybox`): the image warren's demo, benchmarks and tests run.
//!
//!     cargo run -p warren-image --example busybox-layout -- DIR [NAME]

fn main() {
    let mut args = std::env::args_os().skip(1);
    let usage = || -> ! {
        eprintln!("usage: busybox-layout DIR [NAME]");
        std::process::exit(2);
    };
    // `--help` is a question, not a directory to write into.
    let Some(dir) = args
        .next()
        .filter(|d| !d.to_string_lossy().starts_with('-'))
    else {
        usage()
    };
    let name = args
        .next()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "busybox".to_string());
    match warren_image::testing::busybox_layout(std::path::Path::new(&dir), &name) {
        Ok(path) => println!("{}", path.display()),
        Err(e) => {
            eprintln!("busybox-layout: {e}");
            std::process::exit(1);
        }
    }
}
