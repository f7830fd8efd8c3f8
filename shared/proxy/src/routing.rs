//! Where Envoy routes the current request: its route, its cluster, the upstream host a filter
//! chose.
//!
//! Checked in Envoy 1.40 (v8): the route's name is the property `xds.route_name` (the older
//! `route_name` is absent), and the route's cluster is `xds.cluster_name`, both readable from
//! `on_http_request_headers` on, because the connection manager resolves the route before the
//! filter chain runs (a `direct_response` route has no cluster). The upstream host is chosen
//! by the router, after every filter: the property `upstream.address` exists only from the
//! response on. A filter that needs the host at admission reads the header that selects it
//! for an `ORIGINAL_DST` cluster ([`ORIGINAL_DST_HOST`]), as set by Keel's picker running
//! earlier in the chain.

use crate::host::{self, Map};

/// The request header an `ORIGINAL_DST` cluster with `use_http_header: true` routes by
/// (`127.0.0.1:8080`); Keel's picker sets it.
pub const ORIGINAL_DST_HOST: &str = "x-envoy-original-dst-host";

fn property_text(path: &[&str]) -> Option<String> {
    let bytes = host::get_property(path).ok().flatten()?;
    String::from_utf8(bytes).ok().filter(|s| !s.is_empty())
}

/// The Envoy route name: `xds.route_name`, else `route_name` (older Envoys, the harness).
/// `None` for a route without a name. Read once for all the stages of a pipeline
/// ([`crate::memo`]).
pub fn route_name() -> Option<String> {
    crate::memo::remembered(
        |m| &mut m.route,
        || property_text(&["xds", "route_name"]).or_else(|| property_text(&["route_name"])),
    )
}

/// The cluster the route sends to: `xds.cluster_name`, else `cluster_name`. `None` for a
/// route without a cluster (`direct_response`, redirects).
pub fn cluster_name() -> Option<String> {
    crate::memo::remembered(
        |m| &mut m.cluster,
        || property_text(&["xds", "cluster_name"]).or_else(|| property_text(&["cluster_name"])),
    )
}

/// The upstream host chosen ahead of the router, from the [`ORIGINAL_DST_HOST`] request header
/// (readable while the request headers are lent). `None` when absent or not UTF-8.
pub fn original_dst_host() -> Option<String> {
    let bytes = host::get_header(Map::RequestHeaders, ORIGINAL_DST_HOST)
        .ok()
        .flatten()?;
    String::from_utf8(bytes).ok().filter(|s| !s.is_empty())
}

/// The address of the upstream host that served the request (`upstream.address`, `ip:port`),
/// known from the response on.
pub fn upstream_address() -> Option<String> {
    property_text(&["upstream", "address"])
}
