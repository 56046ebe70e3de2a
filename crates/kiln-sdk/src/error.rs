//! Backend errors and their conversion to and from host-allocated ABI errors.
use kiln_abi as abi;

/// Error categories, as Triton's `TRITONSERVER_Error_Code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Unknown,
    Internal,
    NotFound,
    InvalidArg,
    Unavailable,
    Unsupported,
    AlreadyExists,
    Cancelled,
}

impl ErrorCode {
    pub(crate) fn to_abi(self) -> u32 {
        match self {
            ErrorCode::Unknown => abi::KILN_ERROR_UNKNOWN,
            ErrorCode::Internal => abi::KILN_ERROR_INTERNAL,
            ErrorCode::NotFound => abi::KILN_ERROR_NOT_FOUND,
            ErrorCode::InvalidArg => abi::KILN_ERROR_INVALID_ARG,
            ErrorCode::Unavailable => abi::KILN_ERROR_UNAVAILABLE,
            ErrorCode::Unsupported => abi::KILN_ERROR_UNSUPPORTED,
            ErrorCode::AlreadyExists => abi::KILN_ERROR_ALREADY_EXISTS,
            ErrorCode::Cancelled => abi::KILN_ERROR_CANCELLED,
        }
    }

    pub(crate) fn from_abi(v: u32) -> ErrorCode {
        match v {
            abi::KILN_ERROR_INTERNAL => ErrorCode::Internal,
            abi::KILN_ERROR_NOT_FOUND => ErrorCode::NotFound,
            abi::KILN_ERROR_INVALID_ARG => ErrorCode::InvalidArg,
            abi::KILN_ERROR_UNAVAILABLE => ErrorCode::Unavailable,
            abi::KILN_ERROR_UNSUPPORTED => ErrorCode::Unsupported,
            abi::KILN_ERROR_ALREADY_EXISTS => ErrorCode::AlreadyExists,
            abi::KILN_ERROR_CANCELLED => ErrorCode::Cancelled,
            _ => ErrorCode::Unknown,
        }
    }
}

/// An error a backend returns; it reaches the client as the request's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// Category, mapped by the front ends to HTTP / gRPC status.
    pub code: ErrorCode,
    /// Message shown to the client.
    pub message: String,
}

/// Result alias for backend code.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An error with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
        }
    }
    /// `INVALID_ARG`: the request is wrong.
    pub fn invalid_arg(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArg, message)
    }
    /// `INTERNAL`: the backend failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
    /// `UNSUPPORTED`.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unsupported, message)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}
