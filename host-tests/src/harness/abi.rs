//! The proxy-wasm ABI 0.2.1 values the host exchanges with a module: status codes, map and
//! buffer types, the serialized header-pairs format and property paths.
//!
//! Numbers follow the spec (`proxy-wasm/spec`, abi-versions/v0.2.1) and the Rust SDK 0.2.5
//! (`types.rs`); the pairs format follows `hostcalls.rs::utils` of the SDK and `PairsUtil` of
//! proxy-wasm-cpp-host: a little-endian u32 count, then a (name length, value length) u32 pair per
//! entry, then each name and value followed by a NUL byte.

/// `proxy_result_t`: every status of ABI 0.2.1. Which of them a given SDK call accepts is listed
/// in the SDK's `hostcalls.rs`; anything else makes the SDK panic. In normal operation each host
/// call returns only statuses its SDK wrapper accepts (or the ones Envoy really returns, where
/// the SDK then panics in Envoy too); a test makes a call fail with any of them with
/// [`Vm::fail_host_call`](super::Vm::fail_host_call) or
/// [`Host::fail_host_call`](super::Host::fail_host_call).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    BadExpression = 5,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    ResultMismatch = 9,
    InternalFailure = 10,
    BrokenConnection = 11,
    Unimplemented = 12,
}

impl Status {
    /// The ABI's value.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The status's name, as Keel's logs spell it (`InternalFailure`).
    pub fn name(self) -> String {
        format!("{self:?}")
    }
}

/// A host call the test makes fail: the import `call` answers `status` instead of doing its
/// work, `remaining` more times (`None`: every time).
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) call: String,
    pub(crate) status: Status,
    pub(crate) remaining: Option<u64>,
}

/// Takes one answer from the first plan in `plans` for `call` that has answers left.
pub(crate) fn take_failure(plans: &mut [Failure], call: &str) -> Option<Status> {
    let plan = plans
        .iter_mut()
        .find(|p| p.call == call && p.remaining != Some(0))?;
    if let Some(n) = plan.remaining.as_mut() {
        *n -= 1;
    }
    Some(plan.status)
}

/// `proxy_map_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MapType {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
    GrpcInitialMetadata,
    GrpcTrailingMetadata,
    CallResponseHeaders,
    CallResponseTrailers,
}

impl MapType {
    pub(crate) fn from_abi(value: i32) -> Option<MapType> {
        Some(match value {
            0 => MapType::RequestHeaders,
            1 => MapType::RequestTrailers,
            2 => MapType::ResponseHeaders,
            3 => MapType::ResponseTrailers,
            4 => MapType::GrpcInitialMetadata,
            5 => MapType::GrpcTrailingMetadata,
            6 => MapType::CallResponseHeaders,
            7 => MapType::CallResponseTrailers,
            _ => return None,
        })
    }
}

/// `proxy_buffer_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BufferType {
    RequestBody,
    ResponseBody,
    DownstreamData,
    UpstreamData,
    CallResponseBody,
    GrpcReceive,
    VmConfiguration,
    PluginConfiguration,
    CallData,
}

impl BufferType {
    pub(crate) fn from_abi(value: i32) -> Option<BufferType> {
        Some(match value {
            0 => BufferType::RequestBody,
            1 => BufferType::ResponseBody,
            2 => BufferType::DownstreamData,
            3 => BufferType::UpstreamData,
            4 => BufferType::CallResponseBody,
            5 => BufferType::GrpcReceive,
            6 => BufferType::VmConfiguration,
            7 => BufferType::PluginConfiguration,
            8 => BufferType::CallData,
            _ => return None,
        })
    }
}

/// Serializes header pairs in the ABI's format.
pub(crate) fn encode_pairs(pairs: &[(String, String)]) -> Vec<u8> {
    let mut size = 4;
    for (name, value) in pairs {
        size += 8 + name.len() + value.len() + 2;
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (name, value) in pairs {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    for (name, value) in pairs {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
    out
}

/// Parses header pairs in the ABI's format; `None` when the bytes are malformed. An empty slice
/// is an empty map (the SDK passes a null pointer and size 0 for no pairs in some calls).
pub(crate) fn decode_pairs(bytes: &[u8]) -> Option<Vec<(String, String)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = read_u32(bytes, 0)? as usize;
    let mut data = 4usize.checked_add(count.checked_mul(8)?)?;
    if data > bytes.len() {
        return None;
    }
    let mut pairs = Vec::with_capacity(count);
    for n in 0..count {
        let name_len = read_u32(bytes, 4 + n * 8)? as usize;
        let value_len = read_u32(bytes, 8 + n * 8)? as usize;
        let name = bytes.get(data..data.checked_add(name_len)?)?;
        data = data.checked_add(name_len + 1)?;
        let value = bytes.get(data..data.checked_add(value_len)?)?;
        data = data.checked_add(value_len + 1)?;
        pairs.push((
            String::from_utf8_lossy(name).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
    Some(pairs)
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let raw = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(<[u8; 4]>::try_from(raw).ok()?))
}

/// Splits a serialized property path (segments joined by NUL, as the SDK's
/// `serialize_property_path` writes it) into its segments.
pub(crate) fn split_path(path: &[u8]) -> Vec<String> {
    if path.is_empty() {
        return Vec::new();
    }
    path.split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_and_match_the_sdk_layout() {
        let pairs = vec![
            (":method".to_string(), "GET".to_string()),
            ("x".to_string(), String::new()),
        ];
        let bytes = encode_pairs(&pairs);
        assert_eq!(&bytes[..4], &[2, 0, 0, 0]);
        assert_eq!(&bytes[4..12], &[7, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(&bytes[20..28], b":method\0");
        assert_eq!(decode_pairs(&bytes), Some(pairs));
    }

    #[test]
    fn malformed_pairs_are_refused_without_panicking() {
        assert_eq!(decode_pairs(&[]), Some(vec![]));
        assert_eq!(decode_pairs(&[1, 0, 0]), None);
        assert_eq!(decode_pairs(&[9, 0, 0, 0, 1, 0, 0, 0]), None);
        assert_eq!(
            decode_pairs(&[1, 0, 0, 0, 200, 0, 0, 0, 1, 0, 0, 0, b'a', 0]),
            None
        );
        assert_eq!(decode_pairs(&[255, 255, 255, 255]), None);
    }

    #[test]
    fn property_paths_split_on_nul() {
        assert_eq!(split_path(b"request\0path"), vec!["request", "path"]);
        assert_eq!(split_path(b"route_name"), vec!["route_name"]);
        assert!(split_path(b"").is_empty());
    }
}
