//! Generates the server and the client of containerd's sandbox Controller from the vendored
//! protos (`proto/`). protoc comes from `protoc-bin-vendored`, as for warren-proto.

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
            &["proto/github.com/containerd/containerd/api/services/sandbox/v1/sandbox.proto"],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
