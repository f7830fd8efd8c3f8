//! The host functions of proxy-wasm ABI 0.2.1 (module `env`), as Envoy implements them.
//!
//! Each function returns only statuses the Rust SDK 0.2.5 accepts from it (see its
//! `hostcalls.rs`), except where Envoy itself returns one the SDK rejects: then the SDK panics
//! here as it would in Envoy (reading an unavailable header map, `proxy_set_property` without a
//! stream), and except where a test makes the call fail on purpose ([`injected`]): then the
//! call answers the chosen status before doing anything. Guest memory errors trap with a
//! message naming the call.

use wasmtime::{Caller, Extern, Linker, Memory};

use super::abi::{
    decode_pairs, encode_pairs, split_path, take_failure, BufferType, MapType, Status,
};
use super::host::lock;
use super::stream::Direction;
use super::types::{find_header, CalloutRequest, LocalReply, LogLevel, Metric, MetricKind};
use super::vm::{PendingCallout, VmState};

type C<'a> = Caller<'a, VmState>;
type R = wasmtime::Result<i32>;

const OK: i32 = Status::Ok as i32;

/// Counts one call of the host function `name` (see `Vm::host_calls`).
fn count(c: &mut C<'_>, name: &'static str) {
    let fuel = c.get_fuel().ok();
    let st = c.data_mut();
    *st.host_calls
        .entry((st.current_callback, name))
        .or_default() += 1;
    if let (Some(now), Some((mark, last))) = (fuel, st.fuel_mark) {
        *st.fuel_segments
            .entry((st.current_callback, last, name))
            .or_default() += mark.saturating_sub(now);
        st.fuel_mark = Some((now, name));
    }
}

fn memory(c: &mut C<'_>) -> wasmtime::Result<Memory> {
    match c.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => wasmtime::bail!("the module exports no memory"),
    }
}

fn read(c: &mut C<'_>, ptr: i32, len: i32) -> wasmtime::Result<Vec<u8>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let mem = memory(c)?;
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    match start
        .checked_add(len)
        .and_then(|end| mem.data(&*c).get(start..end))
    {
        Some(bytes) => Ok(bytes.to_vec()),
        None => wasmtime::bail!("invalid memory access: {len} bytes at {start:#x}"),
    }
}

fn read_string(c: &mut C<'_>, ptr: i32, len: i32) -> wasmtime::Result<String> {
    Ok(String::from_utf8_lossy(&read(c, ptr, len)?).into_owned())
}

fn write(c: &mut C<'_>, ptr: i32, bytes: &[u8]) -> wasmtime::Result<()> {
    let mem = memory(c)?;
    let start = ptr as u32 as usize;
    match start
        .checked_add(bytes.len())
        .and_then(|end| mem.data_mut(&mut *c).get_mut(start..end))
    {
        Some(slot) => {
            slot.copy_from_slice(bytes);
            Ok(())
        }
        None => wasmtime::bail!(
            "invalid memory access: writing {} bytes at {start:#x}",
            bytes.len()
        ),
    }
}

fn write_u32(c: &mut C<'_>, ptr: i32, value: u32) -> wasmtime::Result<()> {
    write(c, ptr, &value.to_le_bytes())
}

/// Copies `data` into memory the module allocates and writes its address and size, as
/// `copyToPointerSize` does: empty data is a null pointer and size 0.
fn give(c: &mut C<'_>, data: &[u8], ptr_ptr: i32, size_ptr: i32) -> wasmtime::Result<()> {
    let mut address = 0;
    if !data.is_empty() {
        let alloc = c
            .get_export("proxy_on_memory_allocate")
            .or_else(|| c.get_export("malloc"))
            .and_then(Extern::into_func);
        let Some(alloc) = alloc else {
            wasmtime::bail!("the module exports no proxy_on_memory_allocate");
        };
        let alloc = alloc.typed::<i32, i32>(&*c)?;
        c.data_mut().allocations += 1;
        address = alloc.call(&mut *c, data.len() as i32)?;
        if address == 0 {
            wasmtime::bail!("proxy_on_memory_allocate returned null");
        }
        write(c, address, data)?;
    }
    write_u32(c, ptr_ptr, address as u32)?;
    write_u32(c, size_ptr, data.len() as u32)
}

/// A header map as the module may read it now (`None`: not available, Envoy's null map).
fn readable_map(st: &mut VmState, map: MapType) -> Option<Vec<(String, String)>> {
    match map {
        MapType::CallResponseHeaders => st.call_response.as_ref().map(|r| r.headers.clone()),
        MapType::CallResponseTrailers => st.call_response.as_ref().map(|r| r.trailers.clone()),
        _ => writable_map(st, map).map(|m| m.clone()),
    }
}

/// A header map the module may modify now.
fn writable_map(st: &mut VmState, map: MapType) -> Option<&mut Vec<(String, String)>> {
    let stream = st.effective_stream()?;
    let (dir, trailers): (&mut Direction, bool) = match map {
        MapType::RequestHeaders => (&mut stream.request, false),
        MapType::RequestTrailers => (&mut stream.request, true),
        MapType::ResponseHeaders => (&mut stream.response, false),
        MapType::ResponseTrailers => (&mut stream.response, true),
        _ => return None,
    };
    match (trailers, dir.headers_live, dir.trailers_live) {
        (false, true, _) => Some(&mut dir.headers),
        (true, _, true) => Some(&mut dir.trailers),
        _ => None,
    }
}

fn map_type(value: i32) -> Option<MapType> {
    MapType::from_abi(value)
}

/// Resolves a property for the effective context: the stream's own, what Envoy derives from
/// the stream, the VM's, the host's, then the plugin's identity.
fn property(st: &mut VmState, path: &[String]) -> Option<Vec<u8>> {
    let host_props = lock(&st.host.properties).get(path).cloned();
    let vm_prop = st.properties.get(path).cloned();
    let plugin = |st: &VmState| -> Option<Vec<u8>> {
        match path {
            [one] if one == "plugin_name" => Some(st.plugin_name.clone().into_bytes()),
            [one] if one == "plugin_root_id" => Some(st.root_id.clone().into_bytes()),
            [one] if one == "plugin_vm_id" => Some(st.vm_id.clone().into_bytes()),
            _ => None,
        }
    };
    if let Some(stream) = st.effective_stream() {
        if let Some(v) = stream.properties.get(path) {
            return Some(v.clone());
        }
        let key: Vec<&str> = path.iter().map(String::as_str).collect();
        let derived = match key.as_slice() {
            ["request", "time"] => stream
                .request_time
                .map(|t| (t as i64).to_le_bytes().to_vec()),
            ["request", "protocol"] => Some(b"HTTP/1.1".to_vec()),
            ["request", field] if stream.request.headers_live => {
                let headers = &stream.request.headers;
                let header = |name: &str| find_header(headers, name).map(|v| v.as_bytes().to_vec());
                match *field {
                    "path" => header(":path"),
                    "url_path" => find_header(headers, ":path")
                        .map(|p| p.split('?').next().unwrap_or("").as_bytes().to_vec()),
                    "host" => header(":authority"),
                    "scheme" => header(":scheme"),
                    "method" => header(":method"),
                    "referer" => header("referer"),
                    "useragent" => header("user-agent"),
                    "id" => header("x-request-id"),
                    "query" => find_header(headers, ":path")
                        .map(|p| p.split_once('?').map_or("", |(_, q)| q).as_bytes().to_vec()),
                    _ => None,
                }
            }
            ["response", "code"] => stream
                .response_code
                .map(|c| i64::from(c).to_le_bytes().to_vec()),
            _ => None,
        };
        if derived.is_some() {
            return derived;
        }
    }
    vm_prop.or(host_props).or_else(|| plugin(st))
}

/// Records a local reply on the effective stream (Envoy ignores it from a root context).
fn local_reply(st: &mut VmState, reply: LocalReply) {
    st.stop_iteration = true;
    if let Some(stream) = st.effective_stream() {
        if stream.local_reply.is_none() {
            stream.local_reply = Some(reply);
        }
    }
}

fn metric_update(st: &mut VmState, id: u32, f: impl FnOnce(&mut Metric) -> Status) -> Status {
    let Some((kind, name)) = st.metric_ids.get(&id).cloned() else {
        return Status::NotFound;
    };
    let mut metrics = lock(&st.host.metrics);
    let metric = metrics.entry((kind, name.clone())).or_insert(Metric {
        name,
        kind,
        value: 0,
        samples: Vec::new(),
    });
    f(metric)
}

/// The status the test chose for `call`, if the call is to fail now (a plan of the VM first,
/// then the host's); counted in the VM's [`VmState::failed_calls`].
fn injected(c: &mut C<'_>, call: &str) -> Option<i32> {
    let st = c.data_mut();
    let status = take_failure(&mut st.failures, call)
        .or_else(|| take_failure(&mut lock(&st.host.failures), call))?;
    *st.failed_calls.entry(call.to_string()).or_default() += 1;
    Some(status.code())
}

/// Registers every `env` host function of the ABI on the linker.
pub(crate) fn define(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    // ----- logging, time, ticks, lifecycle -----
    linker.func_wrap(
        "env",
        "proxy_log",
        |mut c: C<'_>, level: i32, ptr: i32, len: i32| -> R {
            count(&mut c, "proxy_log");
            if let Some(code) = injected(&mut c, "proxy_log") {
                return Ok(code);
            }
            let message = read_string(&mut c, ptr, len)?;
            let Some(level) = LogLevel::from_abi(level) else {
                return Ok(Status::BadArgument.code());
            };
            c.data_mut()
                .logs
                .push(super::types::LogEntry { level, message });
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut c: C<'_>, ptr: i32| -> R {
            count(&mut c, "proxy_get_log_level");
            let level = c
                .data()
                .host
                .log_level
                .load(std::sync::atomic::Ordering::SeqCst);
            write_u32(&mut c, ptr, level as u32)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, ptr: i32| -> R {
            count(&mut c, "proxy_get_current_time_nanoseconds");
            if let Some(code) = injected(&mut c, "proxy_get_current_time_nanoseconds") {
                return Ok(code);
            }
            let now = c.data().now();
            write(&mut c, ptr, &now.to_le_bytes())?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: C<'_>, ms: i32| -> R {
            count(&mut c, "proxy_set_tick_period_milliseconds");
            if let Some(code) = injected(&mut c, "proxy_set_tick_period_milliseconds") {
                return Ok(code);
            }
            let st = c.data_mut();
            let period = u64::from(ms as u32) * 1_000_000;
            if period == 0 {
                st.tick_period = None;
                st.next_tick = None;
            } else {
                st.tick_period = Some(period);
                st.next_tick = Some(st.now().saturating_add(period));
            }
            Ok(OK)
        },
    )?;
    linker.func_wrap("env", "proxy_done", |mut c: C<'_>| -> R {
        count(&mut c, "proxy_done");
        c.data_mut().done_called = true;
        Ok(OK)
    })?;
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: C<'_>, id: i32| -> R {
            count(&mut c, "proxy_set_effective_context");
            if let Some(code) = injected(&mut c, "proxy_set_effective_context") {
                return Ok(code);
            }
            let st = c.data_mut();
            let id = id as u32;
            // Envoy (cpp-host exports.cc) refuses an unknown or deleted context with BadArgument,
            // the only error the SDK accepts here.
            if !st.is_live_context(id) {
                return Ok(Status::BadArgument.code());
            }
            st.effective = id;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_status",
        |mut c: C<'_>, code_ptr: i32, msg_ptr_ptr: i32, msg_size_ptr: i32| -> R {
            count(&mut c, "proxy_get_status");
            let (code, message) = c.data().status.clone();
            write_u32(&mut c, code_ptr, code)?;
            give(&mut c, message.as_bytes(), msg_ptr_ptr, msg_size_ptr)?;
            Ok(OK)
        },
    )?;

    // ----- header maps -----
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, map: i32, ptr_ptr: i32, size_ptr: i32| -> R {
            count(&mut c, "proxy_get_header_map_pairs");
            if let Some(code) = injected(&mut c, "proxy_get_header_map_pairs") {
                return Ok(code);
            }
            let Some(map) = map_type(map) else {
                return Ok(Status::BadArgument.code());
            };
            let pairs = readable_map(c.data_mut(), map).unwrap_or_default();
            let bytes = if pairs.is_empty() {
                Vec::new()
            } else {
                encode_pairs(&pairs)
            };
            give(&mut c, &bytes, ptr_ptr, size_ptr)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: C<'_>, map: i32, ptr: i32, size: i32| -> R {
            count(&mut c, "proxy_set_header_map_pairs");
            if let Some(code) = injected(&mut c, "proxy_set_header_map_pairs") {
                return Ok(code);
            }
            let bytes = read(&mut c, ptr, size)?;
            let (Some(map), Some(pairs)) = (map_type(map), decode_pairs(&bytes)) else {
                return Ok(Status::BadArgument.code());
            };
            let Some(target) = writable_map(c.data_mut(), map) else {
                return Ok(Status::BadArgument.code());
            };
            *target = pairs
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect();
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: C<'_>, map: i32, key_ptr: i32, key_size: i32, ptr_ptr: i32, size_ptr: i32| -> R {
            count(&mut c, "proxy_get_header_map_value");
            if let Some(code) = injected(&mut c, "proxy_get_header_map_value") {
                return Ok(code);
            }
            let key = read_string(&mut c, key_ptr, key_size)?.to_ascii_lowercase();
            let Some(map) = map_type(map) else {
                return Ok(Status::BadArgument.code());
            };
            let Some(pairs) = readable_map(c.data_mut(), map) else {
                return Ok(Status::BadArgument.code());
            };
            let Some(value) = find_header(&pairs, &key).map(str::to_string) else {
                return Ok(Status::NotFound.code());
            };
            give(&mut c, value.as_bytes(), ptr_ptr, size_ptr)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: C<'_>,
         map: i32,
         key_ptr: i32,
         key_size: i32,
         value_ptr: i32,
         value_size: i32|
         -> R {
            count(&mut c, "proxy_replace_header_map_value");
            if let Some(code) = injected(&mut c, "proxy_replace_header_map_value") {
                return Ok(code);
            }
            let key = read_string(&mut c, key_ptr, key_size)?.to_ascii_lowercase();
            let value = read_string(&mut c, value_ptr, value_size)?;
            let Some(target) = map_type(map).and_then(|m| writable_map(c.data_mut(), m)) else {
                return Ok(Status::BadArgument.code());
            };
            match target.iter().position(|(k, _)| *k == key) {
                Some(first) => {
                    if let Some(entry) = target.get_mut(first) {
                        entry.1 = value;
                    }
                    let mut seen = 0;
                    target.retain(|(k, _)| {
                        if *k != key {
                            return true;
                        }
                        seen += 1;
                        seen == 1
                    });
                }
                None => target.push((key, value)),
            }
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: C<'_>,
         map: i32,
         key_ptr: i32,
         key_size: i32,
         value_ptr: i32,
         value_size: i32|
         -> R {
            count(&mut c, "proxy_add_header_map_value");
            if let Some(code) = injected(&mut c, "proxy_add_header_map_value") {
                return Ok(code);
            }
            let key = read_string(&mut c, key_ptr, key_size)?.to_ascii_lowercase();
            let value = read_string(&mut c, value_ptr, value_size)?;
            let Some(target) = map_type(map).and_then(|m| writable_map(c.data_mut(), m)) else {
                return Ok(Status::BadArgument.code());
            };
            target.push((key, value));
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: C<'_>, map: i32, key_ptr: i32, key_size: i32| -> R {
            count(&mut c, "proxy_remove_header_map_value");
            if let Some(code) = injected(&mut c, "proxy_remove_header_map_value") {
                return Ok(code);
            }
            let key = read_string(&mut c, key_ptr, key_size)?.to_ascii_lowercase();
            let Some(target) = map_type(map).and_then(|m| writable_map(c.data_mut(), m)) else {
                return Ok(Status::BadArgument.code());
            };
            target.retain(|(k, _)| *k != key);
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_size",
        |mut c: C<'_>, map: i32, size_ptr: i32| -> R {
            count(&mut c, "proxy_get_header_map_size");
            let Some(pairs) = map_type(map).and_then(|m| readable_map(c.data_mut(), m)) else {
                return Ok(Status::BadArgument.code());
            };
            let size: usize = pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
            write_u32(&mut c, size_ptr, size as u32)?;
            Ok(OK)
        },
    )?;

    // ----- buffers -----
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: C<'_>, kind: i32, start: i32, max: i32, ptr_ptr: i32, size_ptr: i32| -> R {
            count(&mut c, "proxy_get_buffer_bytes");
            if let Some(code) = injected(&mut c, "proxy_get_buffer_bytes") {
                return Ok(code);
            }
            let Some(kind) = BufferType::from_abi(kind) else {
                return Ok(Status::BadArgument.code());
            };
            let st = c.data_mut();
            let buffer: Option<Vec<u8>> = match kind {
                BufferType::VmConfiguration => Some(st.vm_config.clone()),
                BufferType::PluginConfiguration => {
                    st.in_configure.then(|| st.plugin_config.clone())
                }
                BufferType::CallResponseBody => st.call_response.as_ref().map(|r| r.body.clone()),
                BufferType::RequestBody | BufferType::ResponseBody => {
                    let request = kind == BufferType::RequestBody;
                    Some(
                        st.effective_stream()
                            .map(|s| if request { &s.request } else { &s.response })
                            .filter(|d| d.body_live)
                            .map(|d| d.body.clone())
                            .unwrap_or_default(),
                    )
                }
                _ => Some(Vec::new()),
            };
            let Some(buffer) = buffer else {
                return Ok(Status::NotFound.code());
            };
            let (start, max) = (start as u32 as usize, max as u32 as usize);
            let end = start.saturating_add(max).min(buffer.len());
            let slice = buffer.get(start..end).unwrap_or(&[]);
            give(&mut c, slice, ptr_ptr, size_ptr)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, kind: i32, start: i32, size: i32, ptr: i32, len: i32| -> R {
            count(&mut c, "proxy_set_buffer_bytes");
            if let Some(code) = injected(&mut c, "proxy_set_buffer_bytes") {
                return Ok(code);
            }
            let data = read(&mut c, ptr, len)?;
            let Some(kind) = BufferType::from_abi(kind) else {
                return Ok(Status::BadArgument.code());
            };
            let request = match kind {
                BufferType::RequestBody => true,
                BufferType::ResponseBody => false,
                _ => return Ok(OK),
            };
            let Some(stream) = c.data_mut().effective_stream() else {
                return Ok(OK);
            };
            let dir = if request {
                &mut stream.request
            } else {
                &mut stream.response
            };
            if !dir.body_live {
                return Ok(OK);
            }
            // Envoy's Buffer::copyFrom: at 0, drain `size` bytes and prepend; at or past the
            // end, append; anything else is refused.
            let (start, size) = (start as u32 as usize, size as u32 as usize);
            if start == 0 {
                let drained = size.min(dir.body.len());
                dir.body.drain(..drained);
                dir.body.splice(0..0, data);
            } else if start >= dir.body.len() {
                dir.body.extend_from_slice(&data);
            } else {
                return Ok(Status::BadArgument.code());
            }
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_buffer_status",
        |mut c: C<'_>, kind: i32, len_ptr: i32, flags_ptr: i32| -> R {
            count(&mut c, "proxy_get_buffer_status");
            let st = c.data_mut();
            let len = match BufferType::from_abi(kind) {
                Some(BufferType::VmConfiguration) => st.vm_config.len(),
                Some(BufferType::PluginConfiguration) => st.plugin_config.len(),
                Some(BufferType::CallResponseBody) => {
                    st.call_response.as_ref().map_or(0, |r| r.body.len())
                }
                Some(BufferType::RequestBody) => {
                    st.effective_stream().map_or(0, |s| s.request.body.len())
                }
                Some(BufferType::ResponseBody) => {
                    st.effective_stream().map_or(0, |s| s.response.body.len())
                }
                Some(_) => 0,
                None => return Ok(Status::BadArgument.code()),
            };
            write_u32(&mut c, len_ptr, len as u32)?;
            write_u32(&mut c, flags_ptr, 0)?;
            Ok(OK)
        },
    )?;

    // ----- stream control -----
    linker.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut c: C<'_>, kind: i32| -> R {
            count(&mut c, "proxy_continue_stream");
            if let Some(code) = injected(&mut c, "proxy_continue_stream") {
                return Ok(code);
            }
            if let Some(stream) = c.data_mut().effective_stream() {
                match kind {
                    0 => stream.request.resume(),
                    1 => stream.response.resume(),
                    _ => {}
                }
            }
            Ok(OK)
        },
    )?;
    linker.func_wrap("env", "proxy_continue_request", |mut c: C<'_>| -> R {
        count(&mut c, "proxy_continue_request");
        if let Some(stream) = c.data_mut().effective_stream() {
            stream.request.resume();
        }
        Ok(OK)
    })?;
    linker.func_wrap("env", "proxy_continue_response", |mut c: C<'_>| -> R {
        count(&mut c, "proxy_continue_response");
        if let Some(stream) = c.data_mut().effective_stream() {
            stream.response.resume();
        }
        Ok(OK)
    })?;
    linker.func_wrap(
        "env",
        "proxy_close_stream",
        |mut c: C<'_>, kind: i32| -> R {
            count(&mut c, "proxy_close_stream");
            if kind <= 1 {
                if let Some(stream) = c.data_mut().effective_stream() {
                    stream.reset = true;
                }
            }
            Ok(OK)
        },
    )?;
    linker.func_wrap("env", "proxy_clear_route_cache", |mut c: C<'_>| -> R {
        count(&mut c, "proxy_clear_route_cache");
        Ok(OK)
    })?;
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: C<'_>,
         status: i32,
         details_ptr: i32,
         details_size: i32,
         body_ptr: i32,
         body_size: i32,
         headers_ptr: i32,
         headers_size: i32,
         grpc_status: i32|
         -> R {
            count(&mut c, "proxy_send_local_response");
            if let Some(code) = injected(&mut c, "proxy_send_local_response") {
                return Ok(code);
            }
            let details = read_string(&mut c, details_ptr, details_size)?;
            let body = read(&mut c, body_ptr, body_size)?;
            let raw_headers = read(&mut c, headers_ptr, headers_size)?;
            let headers = decode_pairs(&raw_headers)
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect();
            let reply = LocalReply {
                status: status as u32,
                headers,
                body,
                grpc_status: (0..=16).contains(&grpc_status).then_some(grpc_status),
                details,
            };
            local_reply(c.data_mut(), reply);
            Ok(OK)
        },
    )?;

    // ----- properties -----
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: C<'_>, path_ptr: i32, path_size: i32, ptr_ptr: i32, size_ptr: i32| -> R {
            count(&mut c, "proxy_get_property");
            if let Some(code) = injected(&mut c, "proxy_get_property") {
                return Ok(code);
            }
            let path = split_path(&read(&mut c, path_ptr, path_size)?);
            *c.data_mut().property_reads.entry(path.clone()).or_default() += 1;
            let Some(value) = property(c.data_mut(), &path) else {
                return Ok(Status::NotFound.code());
            };
            give(&mut c, &value, ptr_ptr, size_ptr)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: C<'_>, path_ptr: i32, path_size: i32, value_ptr: i32, value_size: i32| -> R {
            count(&mut c, "proxy_set_property");
            if let Some(code) = injected(&mut c, "proxy_set_property") {
                return Ok(code);
            }
            let path = split_path(&read(&mut c, path_ptr, path_size)?);
            let value = read(&mut c, value_ptr, value_size)?;
            // Envoy stores it in the stream's filter state; without a stream it answers
            // NotFound (which the SDK does not accept: it panics there as here).
            let Some(stream) = c.data_mut().effective_stream() else {
                return Ok(Status::NotFound.code());
            };
            stream.properties.insert(path, value);
            Ok(OK)
        },
    )?;

    // ----- shared data -----
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: C<'_>,
         key_ptr: i32,
         key_size: i32,
         ptr_ptr: i32,
         size_ptr: i32,
         cas_ptr: i32|
         -> R {
            count(&mut c, "proxy_get_shared_data");
            if let Some(code) = injected(&mut c, "proxy_get_shared_data") {
                return Ok(code);
            }
            let key = read_string(&mut c, key_ptr, key_size)?;
            let found = {
                let st = c.data();
                lock(&st.host.shared_data).get(&st.vm_id, &key)
            };
            let Some((value, cas)) = found else {
                return Ok(Status::NotFound.code());
            };
            give(&mut c, &value, ptr_ptr, size_ptr)?;
            write_u32(&mut c, cas_ptr, cas)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: C<'_>,
         key_ptr: i32,
         key_size: i32,
         value_ptr: i32,
         value_size: i32,
         cas: i32|
         -> R {
            count(&mut c, "proxy_set_shared_data");
            if let Some(code) = injected(&mut c, "proxy_set_shared_data") {
                return Ok(code);
            }
            let key = read_string(&mut c, key_ptr, key_size)?;
            let value = read(&mut c, value_ptr, value_size)?;
            let st = c.data();
            let result = lock(&st.host.shared_data).set(&st.vm_id, &key, value, cas as u32);
            Ok(match result {
                Ok(_) => OK,
                Err(()) => Status::CasMismatch.code(),
            })
        },
    )?;

    // ----- shared queues -----
    linker.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: C<'_>, name_ptr: i32, name_size: i32, id_ptr: i32| -> R {
            count(&mut c, "proxy_register_shared_queue");
            if let Some(code) = injected(&mut c, "proxy_register_shared_queue") {
                return Ok(code);
            }
            let name = read_string(&mut c, name_ptr, name_size)?;
            let id = {
                let st = c.data();
                lock(&st.host.queues).register(&st.vm_id, &name, st.index)
            };
            write_u32(&mut c, id_ptr, id)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: C<'_>,
         vm_ptr: i32,
         vm_size: i32,
         name_ptr: i32,
         name_size: i32,
         id_ptr: i32|
         -> R {
            count(&mut c, "proxy_resolve_shared_queue");
            if let Some(code) = injected(&mut c, "proxy_resolve_shared_queue") {
                return Ok(code);
            }
            let vm_id = read_string(&mut c, vm_ptr, vm_size)?;
            let name = read_string(&mut c, name_ptr, name_size)?;
            let found = lock(&c.data().host.queues).resolve(&vm_id, &name);
            let Some(id) = found else {
                return Ok(Status::NotFound.code());
            };
            write_u32(&mut c, id_ptr, id)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut c: C<'_>, id: i32, ptr: i32, size: i32| -> R {
            count(&mut c, "proxy_enqueue_shared_queue");
            if let Some(code) = injected(&mut c, "proxy_enqueue_shared_queue") {
                return Ok(code);
            }
            let value = read(&mut c, ptr, size)?;
            let host = c.data().host.clone();
            let owner = lock(&host.queues).enqueue(id as u32, value);
            let Some(owner) = owner else {
                return Ok(Status::NotFound.code());
            };
            lock(&host.queue_ready).push_back((owner, id as u32));
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: C<'_>, id: i32, ptr_ptr: i32, size_ptr: i32| -> R {
            count(&mut c, "proxy_dequeue_shared_queue");
            if let Some(code) = injected(&mut c, "proxy_dequeue_shared_queue") {
                return Ok(code);
            }
            let item = lock(&c.data().host.queues).dequeue(id as u32);
            match item {
                None => Ok(Status::NotFound.code()),
                Some(None) => Ok(Status::Empty.code()),
                Some(Some(value)) => {
                    give(&mut c, &value, ptr_ptr, size_ptr)?;
                    Ok(OK)
                }
            }
        },
    )?;

    // ----- metrics -----
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: C<'_>, kind: i32, name_ptr: i32, name_size: i32, id_ptr: i32| -> R {
            count(&mut c, "proxy_define_metric");
            if let Some(code) = injected(&mut c, "proxy_define_metric") {
                return Ok(code);
            }
            let name = read_string(&mut c, name_ptr, name_size)?;
            let Some(kind) = MetricKind::from_abi(kind) else {
                return Ok(Status::BadArgument.code());
            };
            let st = c.data_mut();
            st.last_metric += 1;
            let id = st.last_metric;
            st.metric_ids.insert(id, (kind, name.clone()));
            lock(&st.host.metrics)
                .entry((kind, name.clone()))
                .or_insert(Metric {
                    name,
                    kind,
                    value: 0,
                    samples: Vec::new(),
                });
            write_u32(&mut c, id_ptr, id)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |mut c: C<'_>, id: i32, offset: i64| -> R {
            count(&mut c, "proxy_increment_metric");
            if let Some(code) = injected(&mut c, "proxy_increment_metric") {
                return Ok(code);
            }
            let status = metric_update(c.data_mut(), id as u32, |m| match m.kind {
                // Envoy refuses to move a counter by a non-positive offset.
                MetricKind::Counter if offset > 0 => {
                    m.value = m.value.saturating_add(offset);
                    Status::Ok
                }
                MetricKind::Gauge => {
                    m.value = m.value.saturating_add(offset);
                    Status::Ok
                }
                _ => Status::BadArgument,
            });
            Ok(status.code())
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |mut c: C<'_>, id: i32, value: i64| -> R {
            count(&mut c, "proxy_record_metric");
            if let Some(code) = injected(&mut c, "proxy_record_metric") {
                return Ok(code);
            }
            let status = metric_update(c.data_mut(), id as u32, |m| {
                match m.kind {
                    MetricKind::Counter => m.value = m.value.saturating_add(value),
                    MetricKind::Gauge => m.value = value,
                    MetricKind::Histogram => {
                        m.samples.push(value as u64);
                        m.value = m.samples.len() as i64;
                    }
                }
                Status::Ok
            });
            Ok(status.code())
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: C<'_>, id: i32, ptr: i32| -> R {
            count(&mut c, "proxy_get_metric");
            if let Some(code) = injected(&mut c, "proxy_get_metric") {
                return Ok(code);
            }
            let mut value = 0i64;
            let status = metric_update(c.data_mut(), id as u32, |m| match m.kind {
                MetricKind::Histogram => Status::BadArgument,
                _ => {
                    value = m.value;
                    Status::Ok
                }
            });
            if status == Status::Ok {
                write(&mut c, ptr, &value.to_le_bytes())?;
            }
            Ok(status.code())
        },
    )?;

    // ----- HTTP callouts -----
    linker.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: C<'_>,
         upstream_ptr: i32,
         upstream_size: i32,
         headers_ptr: i32,
         headers_size: i32,
         body_ptr: i32,
         body_size: i32,
         trailers_ptr: i32,
         trailers_size: i32,
         timeout_ms: i32,
         token_ptr: i32|
         -> R {
            count(&mut c, "proxy_http_call");
            if let Some(code) = injected(&mut c, "proxy_http_call") {
                return Ok(code);
            }
            let upstream = read_string(&mut c, upstream_ptr, upstream_size)?;
            let raw_headers = read(&mut c, headers_ptr, headers_size)?;
            let body = read(&mut c, body_ptr, body_size)?;
            let raw_trailers = read(&mut c, trailers_ptr, trailers_size)?;
            write_u32(&mut c, token_ptr, 0)?;
            let headers: Vec<(String, String)> = decode_pairs(&raw_headers)
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect();
            let trailers = decode_pairs(&raw_trailers).unwrap_or_default();
            let st = c.data_mut();
            // Envoy: an unknown cluster, or a request without :path, :method or :authority, is
            // refused with BadArgument.
            let known = lock(&st.host.upstreams)
                .as_ref()
                .is_none_or(|names| names.contains(&upstream));
            let complete = [":path", ":method", ":authority"]
                .iter()
                .all(|h| find_header(&headers, h).is_some());
            if !known || !complete {
                return Ok(Status::BadArgument.code());
            }
            st.last_token += 1;
            let token = st.last_token;
            let now = st.now();
            let timeout_ms = u64::from(timeout_ms as u32);
            let request = CalloutRequest {
                token,
                upstream,
                headers,
                body,
                trailers,
                timeout: (timeout_ms > 0).then(|| std::time::Duration::from_millis(timeout_ms)),
                context_id: st.effective,
                vm: st.index,
            };
            let answer = st.host.responder().and_then(|respond| respond(&request));
            let mut pending = PendingCallout {
                request,
                deadline: (timeout_ms > 0).then(|| now.saturating_add(timeout_ms * 1_000_000)),
                scheduled: None,
            };
            if let Some(response) = answer {
                if response.delay.is_zero() {
                    st.immediate.push_back((token, response));
                } else {
                    let delay = u64::try_from(response.delay.as_nanos()).unwrap_or(u64::MAX);
                    pending.scheduled = Some((now.saturating_add(delay), response));
                }
            }
            st.callouts.insert(token, pending);
            write_u32(&mut c, token_ptr, token)?;
            Ok(OK)
        },
    )?;

    // ----- not supported by this host: answered with statuses the SDK accepts -----
    linker.func_wrap(
        "env",
        "proxy_grpc_call",
        |mut c: C<'_>,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32|
         -> R {
            count(&mut c, "proxy_grpc_call");
            Ok(Status::InternalFailure.code())
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_stream",
        |mut c: C<'_>,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32|
         -> R {
            count(&mut c, "proxy_grpc_stream");
            Ok(Status::InternalFailure.code())
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_send",
        |mut c: C<'_>, _: i32, _: i32, _: i32, _: i32| -> R {
            count(&mut c, "proxy_grpc_send");
            Ok(Status::NotFound.code())
        },
    )?;
    linker.func_wrap("env", "proxy_grpc_cancel", |mut c: C<'_>, _: i32| -> R {
        count(&mut c, "proxy_grpc_cancel");
        Ok(Status::NotFound.code())
    })?;
    linker.func_wrap("env", "proxy_grpc_close", |mut c: C<'_>, _: i32| -> R {
        count(&mut c, "proxy_grpc_close");
        Ok(Status::NotFound.code())
    })?;
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |mut c: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| -> R {
            count(&mut c, "proxy_call_foreign_function");
            Ok(Status::NotFound.code())
        },
    )?;
    Ok(())
}
