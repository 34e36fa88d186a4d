//! Generates the host-agent protocol code from `proto/` at build time, with
//! the vendored `protoc` so that no system package is needed: the prost
//! messages and tonic service, and (with pbjson, from the descriptor set
//! protoc writes) their proto3 JSON mapping for the Connect protocol's JSON
//! codec.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/hostagent/v1/hostagent.proto";
    println!("cargo:rerun-if-changed={proto}");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = out.join("hostagent_descriptor.bin");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .file_descriptor_set_path(&descriptors)
        .compile_with_config(config, &[proto], &["proto"])?;
    // Unknown fields are skipped, as connect-go and protobuf-es do by
    // default: a newer client's extra fields must not break an older
    // server.
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptors)?)?
        .ignore_unknown_fields()
        .build(&[".hostagent.v1"])?;
    Ok(())
}
