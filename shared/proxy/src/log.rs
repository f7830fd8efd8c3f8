//! One-line logs that name the filter.

use crate::host::{self, LogLevel};

fn emit(level: LogLevel, filter: &str, message: &str) {
    // A host that cannot log has nowhere to report that either.
    let _ = host::log(level, &format!("keel {filter}: {message}"));
}

/// Logs at error level: `keel <filter>: <message>`.
pub fn error(filter: &str, message: &str) {
    emit(LogLevel::Error, filter, message);
}

/// Logs at warning level.
pub fn warn(filter: &str, message: &str) {
    emit(LogLevel::Warn, filter, message);
}

/// Logs at info level.
pub fn info(filter: &str, message: &str) {
    emit(LogLevel::Info, filter, message);
}

/// Logs at debug level.
pub fn debug(filter: &str, message: &str) {
    emit(LogLevel::Debug, filter, message);
}
