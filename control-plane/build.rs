//! Generates the etcd v3 client the shared store uses from our own protos in `protos/etcd`,
//! compiled with protox (pure Rust): building the control plane needs no system `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("protos/etcd");
    let files = [root.join("mvcc.proto"), root.join("rpc.proto")];
    println!("cargo:rerun-if-changed={}", root.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let descriptor_set = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .include_file("etcd_api.rs")
        .compile_fds(descriptor_set)?;
    Ok(())
}
