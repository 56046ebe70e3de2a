//! The core's typed errors and their mapping to protocol status codes.
use thiserror::Error;

/// Category of a request or model error, as Triton's `TRITONSERVER_Error_Code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Malformed or invalid request (HTTP 400, gRPC INVALID_ARGUMENT).
    InvalidArg,
    /// Unknown model or version (HTTP 404, gRPC NOT_FOUND).
    NotFound,
    /// Not ready, queue full, shutting down (HTTP 503, gRPC UNAVAILABLE).
    Unavailable,
    /// Feature not supported (HTTP 501, gRPC UNIMPLEMENTED).
    Unsupported,
    /// Server or backend failure (HTTP 500, gRPC INTERNAL).
    Internal,
    /// Already exists (HTTP 400, gRPC ALREADY_EXISTS).
    AlreadyExists,
    /// Cancelled (HTTP 400, gRPC CANCELLED).
    Cancelled,
    /// Unknown (HTTP 400, gRPC UNKNOWN).
    Unknown,
}

impl ErrorKind {
    /// HTTP status code, as Triton's HTTP front end maps error codes.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::NotFound => 404,
            ErrorKind::Unavailable => 503,
            ErrorKind::Unsupported => 501,
            ErrorKind::Internal => 500,
            _ => 400,
        }
    }

    /// From the ABI error code.
    pub fn from_abi(code: u32) -> ErrorKind {
        use kiln_abi::*;
        match code {
            KILN_ERROR_INTERNAL => ErrorKind::Internal,
            KILN_ERROR_NOT_FOUND => ErrorKind::NotFound,
            KILN_ERROR_INVALID_ARG => ErrorKind::InvalidArg,
            KILN_ERROR_UNAVAILABLE => ErrorKind::Unavailable,
            KILN_ERROR_UNSUPPORTED => ErrorKind::Unsupported,
            KILN_ERROR_ALREADY_EXISTS => ErrorKind::AlreadyExists,
            KILN_ERROR_CANCELLED => ErrorKind::Cancelled,
            _ => ErrorKind::Unknown,
        }
    }
}

/// An error with a category and a message a person can act on.
#[derive(Debug, Clone, Error)]
#[error("{message}")]
pub struct CoreError {
    /// Category.
    pub kind: ErrorKind,
    /// Message for the client.
    pub message: String,
}

impl CoreError {
    /// Builds an error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        CoreError {
            kind,
            message: message.into(),
        }
    }
    /// INVALID_ARG.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArg, message)
    }
    /// NOT_FOUND.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    /// UNAVAILABLE.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
    /// INTERNAL.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    /// UNSUPPORTED.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
}

/// Convenience alias.
pub type CoreResult<T> = Result<T, CoreError>;
