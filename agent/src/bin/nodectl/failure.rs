//! How a command fails: the exit status nodectl ends with (the list is in
//! main.rs) and the message it prints.

pub struct Failure {
    pub code: u8,
    pub message: String,
}

pub fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

pub fn from_ttrpc(e: ttrpc::Error) -> Failure {
    match e {
        ttrpc::Error::RpcStatus(s) => {
            let code = match s.code() {
                ttrpc::Code::INVALID_ARGUMENT => 2,
                ttrpc::Code::NOT_FOUND => 3,
                ttrpc::Code::FAILED_PRECONDITION => 4,
                ttrpc::Code::ALREADY_EXISTS => 5,
                ttrpc::Code::RESOURCE_EXHAUSTED => 6,
                // The agent answered: what it could not reach is a VMM
                // or a host resource, not itself.
                ttrpc::Code::UNAVAILABLE => 8,
                _ => 1,
            };
            fail(code, s.message().to_string())
        }
        other => fail(7, format!("lost the agent: {other}")),
    }
}
