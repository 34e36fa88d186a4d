//! Generates the host-agent protocol code from `proto/` at build time, with
//! the vendored `protoc` so that no system package is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/hostagent/v1/hostagent.proto";
    println!("cargo:rerun-if-changed={proto}");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &[proto], &["proto"])?;
    Ok(())
}
