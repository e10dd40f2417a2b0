//! Generates a CRI (`runtime.v1`) client for the tests, which drive containerd's CRI plugin
//! the way the kubelet does. The proto is Kubernetes' cri-api `api.proto`, kept in
//! `proto/cri/`; protoc comes from `protoc-bin-vendored`, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    #[allow(unsafe_code)]
    // SAFETY: a build script runs on one thread; nothing reads the environment concurrently.
    unsafe {
        std::env::set_var("PROTOC", protoc);
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_protos(&["proto/cri/api.proto"], &["proto/cri"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
