//! Generates the tonic code for the guest protocol (`warren.guest.v1`), with the vendored
//! protoc so a fresh machine needs none.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    #[allow(unsafe_code)]
    // SAFETY: a build script runs on one thread; nothing reads the environment concurrently.
    unsafe {
        std::env::set_var("PROTOC", protoc);
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/guest.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
