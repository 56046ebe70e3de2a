//! Status codes and JSON → protobuf conversion for the answers the core gives as JSON.
use kiln_core::{CoreError, ErrorKind};
use prost_reflect::DynamicMessage;
use serde_json::Value;
use tonic::{Code, Status};

/// The gRPC status Triton returns for an error of this kind.
pub fn status(e: CoreError) -> Status {
    let code = match e.kind {
        ErrorKind::InvalidArg => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Unsupported => Code::Unimplemented,
        ErrorKind::Internal => Code::Internal,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::Cancelled => Code::Cancelled,
        ErrorKind::Unknown => Code::Unknown,
    };
    Status::new(code, e.message)
}

/// Builds message `T` (protobuf name `full_name`) from the core's Triton-JSON form of it,
/// so each answer has one implementation shared by HTTP and gRPC.
pub fn from_json<T: prost::Message + Default>(full_name: &str, v: &Value) -> Result<T, Status> {
    let desc = kiln_proto::descriptor_pool()
        .get_message_by_name(full_name)
        .ok_or_else(|| Status::internal(format!("message {full_name} missing from the schema")))?;
    let dynamic = DynamicMessage::deserialize(desc, v)
        .map_err(|e| Status::internal(format!("cannot convert {full_name}: {e}")))?;
    dynamic
        .transcode_to::<T>()
        .map_err(|e| Status::internal(format!("cannot convert {full_name}: {e}")))
}
