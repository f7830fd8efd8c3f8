//! Where Envoy routes the current request: its route, its cluster, its upstream host.
//!
//! Checked in Envoy 1.40 (v8): the route's name is the property `xds.route_name` (the older
//! `route_name` is absent), and the route's cluster is `xds.cluster_name`, both readable from
//! `on_http_request_headers` on, because the connection manager resolves the route before the
//! filter chain runs (a `direct_response` route has no cluster). The upstream host is chosen
//! by the router, after every filter: the property `upstream.address` exists only from the
//! response on. A filter that needs the host at admission reads the header that selects it
//! for an `ORIGINAL_DST` cluster ([`ORIGINAL_DST_HOST`]), as set by Keel's picker running
//! earlier in the chain.

use std::cell::RefCell;

use proxy_wasm::hostcalls;

/// The request header an `ORIGINAL_DST` cluster with `use_http_header: true` routes by
/// (`127.0.0.1:8080`); Keel's picker sets it.
pub const ORIGINAL_DST_HOST: &str = "x-envoy-original-dst-host";

fn property_text(path: &[&str]) -> Option<String> {
    let bytes = hostcalls::get_property(path.to_vec()).ok().flatten()?;
    String::from_utf8(bytes).ok().filter(|s| !s.is_empty())
}

/// What one stream's route and cluster are, once read: a pipeline runs several filters on a
/// stream, and each may ask; the host is asked once per stream (a property read is one of the
/// dearer host calls). The pipeline installs a stream's memo while it runs that stream's
/// stages ([`swap_memo`]); a filter running alone has none and reads each time it asks (it
/// asks once per request).
#[derive(Clone, Debug, Default)]
pub struct Memo {
    route: Option<Option<String>>,
    cluster: Option<Option<String>>,
}

thread_local! {
    /// The memo of the stream whose stages run now. A VM runs one callback at a time.
    static MEMO: RefCell<Option<Memo>> = const { RefCell::new(None) };
}

/// Installs `memo` for the stream whose stages are about to run (`None`: no memo) and returns
/// the one it replaces; the caller puts that back when the stages return.
pub fn swap_memo(memo: Option<Memo>) -> Option<Memo> {
    MEMO.with(|m| m.replace(memo))
}

/// Reads through the installed memo, if any.
fn remembered(
    slot: fn(&mut Memo) -> &mut Option<Option<String>>,
    read: fn() -> Option<String>,
) -> Option<String> {
    MEMO.with(|m| match m.try_borrow_mut() {
        Ok(mut memo) => match memo.as_mut() {
            Some(memo) => slot(memo).get_or_insert_with(read).clone(),
            None => read(),
        },
        Err(_) => read(),
    })
}

/// The Envoy route name: `xds.route_name`, else `route_name` (older Envoys, the harness).
/// `None` for a route without a name.
pub fn route_name() -> Option<String> {
    remembered(
        |m| &mut m.route,
        || property_text(&["xds", "route_name"]).or_else(|| property_text(&["route_name"])),
    )
}

/// The cluster the route sends to: `xds.cluster_name`, else `cluster_name`. `None` for a
/// route without a cluster (`direct_response`, redirects).
pub fn cluster_name() -> Option<String> {
    remembered(
        |m| &mut m.cluster,
        || property_text(&["xds", "cluster_name"]).or_else(|| property_text(&["cluster_name"])),
    )
}

/// The upstream host chosen ahead of the router, from the [`ORIGINAL_DST_HOST`] request header
/// (readable while the request headers are lent). `None` when absent or not UTF-8.
pub fn original_dst_host() -> Option<String> {
    let bytes = hostcalls::get_map_value_bytes(
        proxy_wasm::types::MapType::HttpRequestHeaders,
        ORIGINAL_DST_HOST,
    )
    .ok()
    .flatten()?;
    String::from_utf8(bytes).ok().filter(|s| !s.is_empty())
}

/// The address of the upstream host that served the request (`upstream.address`,
/// `ip:port`), known from the response on.
pub fn upstream_address() -> Option<String> {
    property_text(&["upstream", "address"])
}
