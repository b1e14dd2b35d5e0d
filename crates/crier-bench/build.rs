//! Generates the gRPC contract's messages (`proto/crier/v1/crier.proto`,
//! at the repository's root) for the bench's gRPC subscribers: messages
//! only, decoded with prost; no service code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../proto/crier/v1/crier.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["../../proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
