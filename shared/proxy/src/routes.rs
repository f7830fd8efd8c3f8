//! Which policies apply to a route.
//!
//! A policy lists Envoy route names (`"routes": ["orders", "search"]`); no list means every
//! route. Envoy's own `typed_per_filter_config` can also switch a filter off per route; the list
//! is for choosing among several policies of one filter.

/// The route names a policy applies to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteMatch(Option<Vec<String>>);

impl RouteMatch {
    /// Applies to the listed routes, or to all when `routes` is `None`.
    pub fn new(routes: Option<Vec<String>>) -> Self {
        RouteMatch(routes)
    }
    /// Whether a request on `route` (its Envoy route name, if any) is covered.
    pub fn matches(&self, route: Option<&str>) -> bool {
        match (&self.0, route) {
            (None, _) => true,
            (Some(list), Some(route)) => list.iter().any(|r| r == route),
            (Some(_), None) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_by_name() {
        let all = RouteMatch::new(None);
        assert!(all.matches(None));
        assert!(all.matches(Some("x")));
        let some = RouteMatch::new(Some(vec!["orders".into()]));
        assert!(some.matches(Some("orders")));
        assert!(!some.matches(Some("search")));
        assert!(!some.matches(None));
    }
}
