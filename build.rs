//! Generates the gRPC types and services from `csi/csi.proto` (our copy of the CSI v1
//! Identity and Node services) and `proto/argo/artifact.proto` (Argo's artifact driver
//! plugin service, vendored verbatim; see `proto/argo/NOTES.md`). protoc comes from the `protoc-bin-vendored` crate, so the
//! build needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the env.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let include = protoc_bin_vendored::include_path()?;
    println!("cargo:rerun-if-changed=csi/csi.proto");
    let include = include.to_str().ok_or("protoc include path is not UTF-8")?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["csi/csi.proto"], &["csi", include])?;
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/argo/artifact.proto"], &["proto", include])?;
    Ok(())
}
