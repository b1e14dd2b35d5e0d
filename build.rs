//! Generates the gRPC contract's Rust code from `proto/crier/v1/crier.proto`
//! (compiled by protox, in Rust: no system `protoc`), and writes its file
//! descriptor set for server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/crier/v1/crier.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("crier_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        // Clients connect over any channel (the tests): no
        // `connect` helper tied to tonic's transport.
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}
