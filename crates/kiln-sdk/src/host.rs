//! Access to the host's function table, set once at `backend_init`.
use std::sync::OnceLock;

use kiln_abi::{self as abi, KilnHostApi, KilnStr};

use crate::error::{Error, ErrorCode};

static HOST: OnceLock<&'static KilnHostApi> = OnceLock::new();

/// Records the host table. The host guarantees it lives for the whole process.
pub(crate) fn set(host: &'static KilnHostApi) {
    let _ = HOST.set(host);
}

/// The host table; an error before `backend_init` ran.
pub(crate) fn get() -> Result<&'static KilnHostApi, Error> {
    HOST.get()
        .copied()
        .ok_or_else(|| Error::internal("kiln host API used before backend_init"))
}

/// Turns an SDK error into a host-allocated ABI error (null if no host yet).
pub(crate) fn to_abi_error(e: &Error) -> *mut abi::KilnError {
    match HOST.get() {
        // SAFETY: the host table's functions are valid for the process lifetime; the
        // message is borrowed only for the call.
        Some(h) => unsafe { (h.error_new)(e.code.to_abi(), KilnStr::from_str(&e.message)) },
        None => std::ptr::null_mut(),
    }
}

/// Converts (and frees) a host error returned by a host call.
pub(crate) fn check(err: *mut abi::KilnError) -> Result<(), Error> {
    if err.is_null() {
        return Ok(());
    }
    let h = get()?;
    // SAFETY: `err` is a live host error; we read it and then delete it exactly once.
    unsafe {
        let code = ErrorCode::from_abi((h.error_code)(err));
        let msg = String::from_utf8_lossy((h.error_message)(err).as_bytes()).into_owned();
        (h.error_delete)(err);
        Err(Error::new(code, msg))
    }
}

/// Log severity.
#[derive(Debug, Clone, Copy)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Verbose,
}

/// Logs through the server's logger (a no-op before `backend_init`).
pub fn log(level: LogLevel, message: &str) {
    if let Some(h) = HOST.get() {
        let l = match level {
            LogLevel::Error => abi::KILN_LOG_ERROR,
            LogLevel::Warn => abi::KILN_LOG_WARN,
            LogLevel::Info => abi::KILN_LOG_INFO,
            LogLevel::Verbose => abi::KILN_LOG_VERBOSE,
        };
        // SAFETY: valid host function; message borrowed for the call.
        unsafe { (h.log)(l, KilnStr::from_str(message)) }
    }
}

/// Host monotonic clock in nanoseconds (0 before `backend_init`).
pub(crate) fn clock_ns() -> u64 {
    // SAFETY: valid host function.
    HOST.get().map(|h| unsafe { (h.clock_ns)() }).unwrap_or(0)
}
