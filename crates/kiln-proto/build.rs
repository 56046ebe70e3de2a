//! Compiles the `.proto` files with protox (pure Rust, no system `protoc`) and generates
//! prost types plus an encoded descriptor set used for text-format and JSON reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/model_config.proto", "proto/grpc_service.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let encoded = prost::Message::encode_to_vec(&fds);
    std::fs::write(out.join("descriptor_set.bin"), encoded)?;
    prost_build::Config::new()
        // Tensor payloads (raw_input_contents, ...) become `bytes::Bytes`: slices of the
        // received buffer instead of copies.
        .bytes(["."])
        .compile_fds(fds)?;
    Ok(())
}
