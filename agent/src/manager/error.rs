//! The core's one error type: each becomes a ttrpc status with this code
//! and message at the edge.

/// An API error: becomes a ttrpc status with this code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    InvalidArgument(String),
    NotFound(String),
    AlreadyExists(String),
    FailedPrecondition(String),
    ResourceExhausted(String),
    Unavailable(String),
    Internal(String),
}

impl ApiError {
    /// What went wrong, without the kind.
    pub fn message(&self) -> &str {
        match self {
            ApiError::InvalidArgument(m)
            | ApiError::NotFound(m)
            | ApiError::AlreadyExists(m)
            | ApiError::FailedPrecondition(m)
            | ApiError::ResourceExhausted(m)
            | ApiError::Unavailable(m)
            | ApiError::Internal(m) => m,
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, msg) = match self {
            ApiError::InvalidArgument(m) => ("invalid argument", m),
            ApiError::NotFound(m) => ("not found", m),
            ApiError::AlreadyExists(m) => ("already exists", m),
            ApiError::FailedPrecondition(m) => ("failed precondition", m),
            ApiError::ResourceExhausted(m) => ("resource exhausted", m),
            ApiError::Unavailable(m) => ("unavailable", m),
            ApiError::Internal(m) => ("internal", m),
        };
        write!(f, "{kind}: {msg}")
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

pub(super) fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

/// A VMM that answered with an error keeps its code and only its message
/// (a full disk is its FAILED_PRECONDITION, not "unreachable"); a VMM that
/// did not answer is UNAVAILABLE.
pub(super) fn vmm_error(e: ttrpc::Error) -> ApiError {
    match e {
        ttrpc::Error::RpcStatus(s) => {
            let message = format!("the VMM refused: {}", s.message());
            match s.code() {
                ttrpc::Code::INVALID_ARGUMENT => ApiError::InvalidArgument(message),
                ttrpc::Code::NOT_FOUND => ApiError::NotFound(message),
                ttrpc::Code::ALREADY_EXISTS => ApiError::AlreadyExists(message),
                ttrpc::Code::FAILED_PRECONDITION => ApiError::FailedPrecondition(message),
                ttrpc::Code::RESOURCE_EXHAUSTED => ApiError::ResourceExhausted(message),
                ttrpc::Code::UNAVAILABLE => ApiError::Unavailable(message),
                _ => ApiError::Internal(message),
            }
        }
        other => ApiError::Unavailable(format!("the VMM did not answer: {other}")),
    }
}
