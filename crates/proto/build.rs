//! Generates the tonic code for warren.v1. protoc comes from `protoc-bin-vendored`, so a
//! fresh machine builds without a system protoc.

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
        .compile_protos(
            &[
                "proto/warren/v1/sandbox.proto",
                "proto/warren/v1/cluster.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
