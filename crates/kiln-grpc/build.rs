//! Generates the tonic server for `inference.GRPCInferenceService`. The messages come from
//! `kiln-proto` (same .proto files), so only the service code is generated here.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from("../kiln-proto/proto");
    let file = dir.join("grpc_service.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&dir])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(false)
        .build_transport(false)
        .extern_path(".inference", "::kiln_proto::inference")
        .compile_fds(fds)?;
    Ok(())
}
