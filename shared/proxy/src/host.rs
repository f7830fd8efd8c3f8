//! The host calls Keel survives: proxy-wasm ABI 0.2.1 imports called directly, every status the
//! ABI defines handed back as a value. The one place in keel-proxy with `unsafe`.
//!
//! Why not the SDK's wrappers (`proxy_wasm::hostcalls`): proxy-wasm 0.2.5 `panic!`s on most
//! statuses a call does not expect (`set_shared_data` accepts only Ok and CasMismatch,
//! `define_metric` and `set_tick_period` only Ok, `get_property` Ok, NotFound,
//! SerializationFailure and InternalFailure), and a panic is an abort: the VM traps and takes
//! every request of its worker with it. A host that refuses shared data, ticks, metrics or a
//! property (a proxy under memory pressure, a host without the capability, such as Kong's or
//! APISIX's modules) would then crash Keel instead of letting it fail open as documented.
//! The imports are declared here returning a plain `u32`, so that a status the SDK's `Status`
//! enum does not know (ResultMismatch, Unimplemented, ...) is a value, not undefined behaviour.
//!
//! Every function answers the ABI's ordinary outcomes as values (a missing key or property is
//! `Ok(None)`, a lost compare-and-swap is `Err(Status::CasMismatch)`, a finished stream refuses
//! `set_effective_context` with `Err(Status::BadArgument)`) and reports any other status with
//! [`report`]: one warning per call and status per VM (`keel host: proxy_set_shared_data
//! answered InternalFailure; ...`) and the counter `keel.host.<call>.failed`. The caller then
//! does what its filter documents (fail open, skip, count); `docs/operations.md` lists it.
//!
//! Callouts stay on the SDK (`proxy_wasm::hostcalls::dispatch_http_call`): its dispatcher must
//! register the token to deliver the answer, and it accepts the two refusals Envoy gives
//! (BadArgument, InternalFailure).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::ptr::null_mut;

/// A status other than Ok, as proxy-wasm ABI 0.2.1 defines them (`proxy_status_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// 1: the key, property, header or queue does not exist.
    NotFound,
    /// 2: an argument the host refuses (an unknown context, a map not lent now).
    BadArgument,
    /// 3: the host could not serialize the value.
    SerializationFailure,
    /// 4: the host could not parse what the module passed.
    ParseFailure,
    /// 5: a bad expression (the ABI's CEL calls).
    BadExpression,
    /// 6: the module passed memory the host cannot access.
    InvalidMemoryAccess,
    /// 7: nothing there (an empty queue).
    Empty,
    /// 8: the compare-and-swap version did not match.
    CasMismatch,
    /// 9: a result mismatch.
    ResultMismatch,
    /// 10: the host failed.
    InternalFailure,
    /// 11: the connection broke.
    BrokenConnection,
    /// 12: the host does not implement the call.
    Unimplemented,
    /// A value the ABI does not define.
    Other(u32),
}

impl Status {
    /// The ABI's value; `Ok` (0) is `None`.
    fn from_code(code: u32) -> Option<Status> {
        Some(match code {
            0 => return None,
            1 => Status::NotFound,
            2 => Status::BadArgument,
            3 => Status::SerializationFailure,
            4 => Status::ParseFailure,
            5 => Status::BadExpression,
            6 => Status::InvalidMemoryAccess,
            7 => Status::Empty,
            8 => Status::CasMismatch,
            9 => Status::ResultMismatch,
            10 => Status::InternalFailure,
            11 => Status::BrokenConnection,
            12 => Status::Unimplemented,
            other => Status::Other(other),
        })
    }

    /// The ABI's value.
    pub fn code(self) -> u32 {
        match self {
            Status::NotFound => 1,
            Status::BadArgument => 2,
            Status::SerializationFailure => 3,
            Status::ParseFailure => 4,
            Status::BadExpression => 5,
            Status::InvalidMemoryAccess => 6,
            Status::Empty => 7,
            Status::CasMismatch => 8,
            Status::ResultMismatch => 9,
            Status::InternalFailure => 10,
            Status::BrokenConnection => 11,
            Status::Unimplemented => 12,
            Status::Other(code) => code,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Other(code) => write!(f, "status {code}"),
            named => write!(f, "{named:?}"),
        }
    }
}

fn check(code: u32) -> Result<(), Status> {
    match Status::from_code(code) {
        None => Ok(()),
        Some(status) => Err(status),
    }
}

// ----- reporting -----

thread_local! {
    /// The (call, status) pairs already logged by this VM.
    static LOGGED: RefCell<BTreeMap<(&'static str, u32), ()>> = const { RefCell::new(BTreeMap::new()) };
    /// This VM's `keel.host.<call>.failed` counters, by call (`None`: could not be defined).
    static FAILED: RefCell<BTreeMap<&'static str, Option<u32>>> = const { RefCell::new(BTreeMap::new()) };
    /// Set while a failure is being reported: a failing log or metric call then reports nothing
    /// (it would report itself forever).
    static REPORTING: Cell<bool> = const { Cell::new(false) };
}

/// The name of the counter of `call`'s failures: `keel.host.<call>.failed`.
fn failure_metric(call: &str) -> String {
    format!("keel.host.{call}.failed")
}

/// Reports that the host answered `call` with `status`, a failure the caller survives: logs one
/// warning the first time this VM sees that call fail with that status, and counts every time
/// in `keel.host.<call>.failed`.
pub fn report(call: &'static str, status: Status) {
    if REPORTING.with(|r| r.replace(true)) {
        return;
    }
    let first = LOGGED.with(|logged| match logged.try_borrow_mut() {
        Ok(mut logged) => logged.insert((call, status.code()), ()).is_none(),
        Err(_) => false,
    });
    if first {
        let message = format!(
            "keel host: {call} answered {status}; carrying on without it (counted in {}; logged once per VM)",
            failure_metric(call)
        );
        let _ = log(LogLevel::Warn, &message);
    }
    let id = FAILED.with(|failed| {
        let Ok(mut failed) = failed.try_borrow_mut() else {
            return None;
        };
        *failed
            .entry(call)
            .or_insert_with(|| define_metric(MetricType::Counter, &failure_metric(call)).ok())
    });
    if let Some(id) = id {
        let _ = increment_metric(id, 1);
    }
    REPORTING.with(|r| r.set(false));
}

/// `result`, with any error but the `expected` ones [`report`]ed.
fn reported<T>(
    call: &'static str,
    result: Result<T, Status>,
    expected: &[Status],
) -> Result<T, Status> {
    if let Err(status) = result {
        if !expected.contains(&status) {
            report(call, status);
        }
    }
    result
}

/// Takes ownership of bytes the host wrote into memory it asked the module to allocate
/// (the SDK's `proxy_on_memory_allocate`: a `Vec<u8>` of exactly `size` capacity).
fn take(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        return None;
    }
    // SAFETY: the host returned a pointer from the module's own allocator export, which made a
    // `Vec<u8>` with capacity `size` and forgot it; nothing else owns it.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

// ----- the imports -----

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
}

/// `proxy_log_level_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    /// 1.
    Debug = 1,
    /// 2.
    Info = 2,
    /// 3.
    Warn = 3,
    /// 4.
    Error = 4,
}

/// `proxy_metric_type_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricType {
    /// 0.
    Counter = 0,
    /// 1.
    Gauge = 1,
}

/// `proxy_map_type_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Map {
    /// 0.
    RequestHeaders = 0,
    /// 2.
    ResponseHeaders = 2,
    /// 6.
    CallResponseHeaders = 6,
}

/// `proxy_buffer_type_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Buffer {
    /// 0.
    RequestBody = 0,
    /// 1.
    ResponseBody = 1,
    /// 4.
    CallResponseBody = 4,
    /// 7.
    PluginConfiguration = 7,
}

/// `proxy_stream_type_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamType {
    /// 0.
    HttpRequest = 0,
    /// 1.
    HttpResponse = 1,
}

/// `proxy_log`. Not reported: a host that cannot log has nowhere to report that either.
pub fn log(level: LogLevel, message: &str) -> Result<(), Status> {
    // SAFETY: the pointer and length describe `message`, alive for the call.
    check(unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) })
}

/// `proxy_get_current_time_nanoseconds`: nanoseconds since the Unix epoch.
pub fn current_time_nanos() -> Result<u64, Status> {
    let mut time = 0u64;
    // SAFETY: `time` is a valid u64 the host writes.
    let code = unsafe { proxy_get_current_time_nanoseconds(&mut time) };
    reported("proxy_get_current_time_nanoseconds", check(code), &[]).map(|()| time)
}

/// `proxy_set_tick_period_milliseconds` (0 stops the ticks).
pub fn set_tick_period_ms(millis: u32) -> Result<(), Status> {
    // SAFETY: no pointers.
    let code = unsafe { proxy_set_tick_period_milliseconds(millis) };
    reported("proxy_set_tick_period_milliseconds", check(code), &[])
}

/// [`set_tick_period_ms`] with a duration, in whole milliseconds (rounded down, saturating).
pub fn set_tick_period(period: std::time::Duration) -> Result<(), Status> {
    set_tick_period_ms(u32::try_from(period.as_millis()).unwrap_or(u32::MAX))
}

/// A property path as the ABI takes it: the parts joined by NUL bytes.
fn property_path(path: &[&str]) -> Vec<u8> {
    let mut serialized = Vec::with_capacity(path.iter().map(|p| p.len() + 1).sum());
    for (i, part) in path.iter().enumerate() {
        if i > 0 {
            serialized.push(0);
        }
        serialized.extend_from_slice(part.as_bytes());
    }
    serialized
}

/// `proxy_set_property`: sets a stream property (Envoy keeps it as filter state of the stream,
/// readable by the other filters of that stream).
pub fn set_property(path: &[&str], value: &[u8]) -> Result<(), Status> {
    let serialized = property_path(path);
    // SAFETY: the pointers and lengths describe `serialized` and `value`, alive for the call.
    let code = unsafe {
        proxy_set_property(
            serialized.as_ptr(),
            serialized.len(),
            value.as_ptr(),
            value.len(),
        )
    };
    reported("proxy_set_property", check(code), &[])
}

/// `proxy_get_property`; a missing property is `Ok(None)`.
pub fn get_property(path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
    let serialized = property_path(path);
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: the path pointer and length describe `serialized`; the host writes `data`/`size`.
    let code =
        unsafe { proxy_get_property(serialized.as_ptr(), serialized.len(), &mut data, &mut size) };
    match reported("proxy_get_property", check(code), &[Status::NotFound]) {
        Ok(()) => Ok(take(data, size)),
        Err(Status::NotFound) => Ok(None),
        Err(status) => Err(status),
    }
}

/// `proxy_get_shared_data`: the value and its version; a missing key is `Ok(None)`.
pub fn get_shared_data(key: &str) -> Result<Option<(Vec<u8>, u32)>, Status> {
    let (mut data, mut size, mut cas) = (null_mut(), 0usize, 0u32);
    // SAFETY: the key pointer and length describe `key`; the host writes the three outputs.
    let code =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    match reported("proxy_get_shared_data", check(code), &[Status::NotFound]) {
        Ok(()) => Ok(Some((take(data, size).unwrap_or_default(), cas))),
        Err(Status::NotFound) => Ok(None),
        Err(status) => Err(status),
    }
}

/// `proxy_set_shared_data`: writes `value` if the stored version is `cas` (0: whatever it is).
/// A lost race is `Err(Status::CasMismatch)`, not reported.
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
    // SAFETY: the pointers and lengths describe `key` and `value`, alive for the call.
    let code =
        unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) };
    reported("proxy_set_shared_data", check(code), &[Status::CasMismatch])
}

/// `proxy_define_metric`: the metric's id.
pub fn define_metric(kind: MetricType, name: &str) -> Result<u32, Status> {
    let mut id = 0u32;
    // SAFETY: the name pointer and length describe `name`; the host writes `id`.
    let code = unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) };
    reported("proxy_define_metric", check(code), &[]).map(|()| id)
}

/// `proxy_increment_metric`.
pub fn increment_metric(id: u32, offset: i64) -> Result<(), Status> {
    // SAFETY: no pointers.
    let code = unsafe { proxy_increment_metric(id, offset) };
    reported("proxy_increment_metric", check(code), &[])
}

/// `proxy_record_metric`.
pub fn record_metric(id: u32, value: u64) -> Result<(), Status> {
    // SAFETY: no pointers.
    let code = unsafe { proxy_record_metric(id, value) };
    reported("proxy_record_metric", check(code), &[])
}

/// `proxy_get_header_map_value`: one header's value as bytes; absent is `Ok(None)`.
pub fn get_header(map: Map, name: &str) -> Result<Option<Vec<u8>>, Status> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: the name pointer and length describe `name`; the host writes `data`/`size`.
    let code = unsafe {
        proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), &mut data, &mut size)
    };
    match reported(
        "proxy_get_header_map_value",
        check(code),
        &[Status::NotFound],
    ) {
        Ok(()) => Ok(Some(take(data, size).unwrap_or_default())),
        Err(Status::NotFound) => Ok(None),
        Err(status) => Err(status),
    }
}

/// `proxy_get_header_map_pairs`: every header, in order, as (name, value bytes).
pub fn get_headers(map: Map) -> Result<Vec<(String, Vec<u8>)>, Status> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: the host writes `data`/`size`.
    let code = unsafe { proxy_get_header_map_pairs(map as u32, &mut data, &mut size) };
    reported("proxy_get_header_map_pairs", check(code), &[])?;
    Ok(take(data, size)
        .map(|bytes| decode_pairs(&bytes))
        .unwrap_or_default())
}

/// `proxy_replace_header_map_value` (`Some`) or `proxy_remove_header_map_value` (`None`).
pub fn set_header(map: Map, name: &str, value: Option<&[u8]>) -> Result<(), Status> {
    match value {
        Some(value) => {
            // SAFETY: the pointers and lengths describe `name` and `value`.
            let code = unsafe {
                proxy_replace_header_map_value(
                    map as u32,
                    name.as_ptr(),
                    name.len(),
                    value.as_ptr(),
                    value.len(),
                )
            };
            reported("proxy_replace_header_map_value", check(code), &[])
        }
        None => {
            // SAFETY: the pointer and length describe `name`.
            let code =
                unsafe { proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) };
            reported("proxy_remove_header_map_value", check(code), &[])
        }
    }
}

/// `proxy_add_header_map_value`.
pub fn add_header(map: Map, name: &str, value: &[u8]) -> Result<(), Status> {
    // SAFETY: the pointers and lengths describe `name` and `value`.
    let code = unsafe {
        proxy_add_header_map_value(
            map as u32,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    };
    reported("proxy_add_header_map_value", check(code), &[])
}

/// `proxy_get_buffer_bytes`: at most `max` bytes from `start`; nothing there is empty.
pub fn get_buffer(buffer: Buffer, start: usize, max: usize) -> Result<Vec<u8>, Status> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: the host writes `data`/`size`.
    let code = unsafe { proxy_get_buffer_bytes(buffer as u32, start, max, &mut data, &mut size) };
    match reported("proxy_get_buffer_bytes", check(code), &[Status::NotFound]) {
        Ok(()) => Ok(take(data, size).unwrap_or_default()),
        Err(Status::NotFound) => Ok(Vec::new()),
        Err(status) => Err(status),
    }
}

/// `proxy_set_effective_context`. A finished stream is `Err(Status::BadArgument)`, not
/// reported (the stream is gone, there is nobody to act on).
pub fn set_effective_context(context_id: u32) -> Result<(), Status> {
    // SAFETY: no pointers.
    let code = unsafe { proxy_set_effective_context(context_id) };
    reported(
        "proxy_set_effective_context",
        check(code),
        &[Status::BadArgument],
    )
}

/// `proxy_continue_stream`: lets the effective context's request or response go on.
pub fn continue_stream(stream: StreamType) -> Result<(), Status> {
    // SAFETY: no pointers.
    let code = unsafe { proxy_continue_stream(stream as u32) };
    reported("proxy_continue_stream", check(code), &[])
}

/// `proxy_send_local_response` on the effective context.
pub fn send_local_response(
    status: u32,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(), Status> {
    let headers = encode_pairs(headers);
    // SAFETY: the pointers and lengths describe `body` and `headers`, alive for the call.
    let code = unsafe {
        proxy_send_local_response(
            status,
            std::ptr::null(),
            0,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    };
    reported("proxy_send_local_response", check(code), &[])
}

// ----- the ABI's header-pairs format -----

/// A little-endian u32 count, a (name length, value length) pair per entry, then each name and
/// value followed by a NUL byte.
fn encode_pairs(pairs: &[(&str, &str)]) -> Vec<u8> {
    let size = 4 + pairs
        .iter()
        .map(|(k, v)| 10 + k.len() + v.len())
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    out.extend_from_slice(&len(pairs.len()));
    for (name, value) in pairs {
        out.extend_from_slice(&len(name.len()));
        out.extend_from_slice(&len(value.len()));
    }
    for (name, value) in pairs {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
    out
}

/// The inverse of [`encode_pairs`]; a malformed map yields the entries read before the fault.
fn decode_pairs(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let word = |at: usize| -> Option<usize> {
        let raw: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(raw)).ok()
    };
    let Some(count) = word(0) else {
        return Vec::new();
    };
    let mut pairs = Vec::with_capacity(count.min(bytes.len() / 8));
    let Some(mut at) = count.checked_mul(8).and_then(|n| n.checked_add(4)) else {
        return pairs;
    };
    for i in 0..count {
        let (Some(name_len), Some(value_len)) = (word(4 + i * 8), word(8 + i * 8)) else {
            break;
        };
        let Some(name) = at.checked_add(name_len).and_then(|end| bytes.get(at..end)) else {
            break;
        };
        at += name_len + 1;
        let Some(value) = at.checked_add(value_len).and_then(|end| bytes.get(at..end)) else {
            break;
        };
        at += value_len + 1;
        pairs.push((String::from_utf8_lossy(name).into_owned(), value.to_vec()));
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_the_abi_values() {
        for code in 1..=13 {
            let status = Status::from_code(code).unwrap();
            assert_eq!(status.code(), code);
        }
        assert_eq!(Status::from_code(0), None);
        assert_eq!(Status::from_code(12), Some(Status::Unimplemented));
        assert_eq!(Status::InternalFailure.to_string(), "InternalFailure");
        assert_eq!(Status::Other(99).to_string(), "status 99");
    }

    #[test]
    fn pairs_round_trip() {
        let bytes = encode_pairs(&[(":status", "200"), ("x", "")]);
        assert_eq!(&bytes[..4], &[2, 0, 0, 0]);
        assert_eq!(
            decode_pairs(&bytes),
            vec![
                (":status".to_string(), b"200".to_vec()),
                ("x".to_string(), Vec::new())
            ]
        );
        assert!(decode_pairs(&[]).is_empty());
        assert!(decode_pairs(&[9, 0, 0, 0, 1]).is_empty());
    }
}
