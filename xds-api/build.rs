//! Compiles `../protos` with protox (pure Rust, no system `protoc`) and generates prost messages
//! and tonic clients/servers. The encoded descriptor set is kept for the JSON/YAML mapping.

use std::path::{Path, PathBuf};

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../protos");
    println!("cargo:rerun-if-changed={}", root.display());

    let mut files = Vec::new();
    collect_protos(&root, &mut files)?;
    files.sort();
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let descriptor_set = protox::compile(&files, [&root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // Source info (comments, spans) feeds the generated docs only. The runtime copy drops it:
    // every process that builds the reflection pool would otherwise hold it in memory.
    let mut runtime_set = descriptor_set.clone();
    for file in &mut runtime_set.file {
        file.source_code_info = None;
    }
    std::fs::write(
        out_dir.join("descriptor_set.bin"),
        prost::Message::encode_to_vec(&runtime_set),
    )?;

    let mut config = prost_build::Config::new();
    config.enable_type_names();
    // Any type URLs on the wire are `type.googleapis.com/<full name>`, as Envoy expects.
    config.type_name_domain(["."], "type.googleapis.com");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .include_file("xds_api.rs")
        .compile_fds_with_config(descriptor_set, config)?;
    Ok(())
}
