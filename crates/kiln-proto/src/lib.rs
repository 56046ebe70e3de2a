//! Triton's protobuf schemas for Kiln.
//!
//! * [`inference`] — prost types generated from `proto/model_config.proto` (Triton's
//!   `ModelConfig`, same names and field numbers).
//! * [`descriptor_pool`] — the same schema as a reflection pool, used to parse
//!   `config.pbtxt` (protobuf text format) and to print the config as Triton's JSON.

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, MessageDescriptor};

/// Generated protobuf types, in Triton's package `inference`.
#[allow(clippy::all, missing_docs)]
pub mod inference {
    include!(concat!(env!("OUT_DIR"), "/inference.rs"));
}

static DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor_set.bin"));

/// The reflection pool holding every message of the compiled schemas.
pub fn descriptor_pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        // The descriptor set is produced by build.rs from our own .proto files; decoding it
        // cannot fail unless the build itself is broken.
        DescriptorPool::decode(DESCRIPTOR_SET).expect("descriptor set built by build.rs is valid")
    })
}

/// Descriptor of `inference.ModelConfig`.
pub fn model_config_descriptor() -> MessageDescriptor {
    descriptor_pool()
        .get_message_by_name("inference.ModelConfig")
        .expect("inference.ModelConfig is in the compiled schema")
}
