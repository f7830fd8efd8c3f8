//! Which policy applies to a request's route: the one rule every filter (and the pipeline's
//! stages) selects by.
//!
//! A policy may list Envoy route names (`"routes": ["orders", "search"]`); no list means every
//! route. A request whose host gave no route name is covered only by a policy without a list.
//! Filters that apply one policy per request take the first that covers the route, in
//! configuration order ([`first`]); the rate limiter applies every one that covers it
//! ([`Routed::applies_to`]). Reading the route name is one of the dearer host calls, so a glue
//! reads it only when some policy lists routes ([`any_listed`]).

use alloc::string::String;

/// Something that applies to some Envoy routes: a filter's policy, a pipeline's stage.
pub trait Routed {
    /// The route names it applies to; `None`: every route.
    fn routes(&self) -> Option<&[String]>;

    /// Whether it applies to a request on `route` (its Envoy route name, if the host gave
    /// one).
    fn applies_to(&self, route: Option<&str>) -> bool {
        matches(self.routes(), route)
    }
}

/// Whether a list of route names (`None`: every route) covers a request on `route`.
pub fn matches(routes: Option<&[String]>, route: Option<&str>) -> bool {
    match (routes, route) {
        (None, _) => true,
        (Some(list), Some(route)) => list.iter().any(|r| r == route),
        (Some(_), None) => false,
    }
}

/// The first of `items` (in order) whose policy (`policy` of the item) applies to `route`, with
/// its index.
pub fn first<'a, T, P>(
    items: &'a [T],
    route: Option<&str>,
    policy: impl Fn(&'a T) -> &'a P,
) -> Option<(usize, &'a T)>
where
    P: Routed + ?Sized + 'a,
{
    items
        .iter()
        .enumerate()
        .find(|(_, item)| policy(item).applies_to(route))
}

/// Whether any of `items`' policies lists routes: only then does selection need the route name.
pub fn any_listed<'a, T, P>(items: &'a [T], policy: impl Fn(&'a T) -> &'a P) -> bool
where
    P: Routed + ?Sized + 'a,
{
    items.iter().any(|item| policy(item).routes().is_some())
}

impl Routed for Option<crate::config::Routes> {
    fn routes(&self) -> Option<&[String]> {
        self.as_ref().map(crate::config::Routes::names)
    }
}

impl Routed for Option<alloc::vec::Vec<String>> {
    fn routes(&self) -> Option<&[String]> {
        self.as_deref()
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use alloc::string::ToString;
    use alloc::vec;
    use alloc::vec::Vec;

    fn list(names: &[&str]) -> Option<Vec<String>> {
        Some(names.iter().map(|n| n.to_string()).collect())
    }

    #[test]
    fn a_list_covers_its_routes_and_no_list_covers_all() {
        let all: Option<Vec<String>> = None;
        assert!(all.applies_to(None));
        assert!(all.applies_to(Some("x")));
        let some = list(&["orders"]);
        assert!(some.applies_to(Some("orders")));
        assert!(!some.applies_to(Some("search")));
        assert!(
            !some.applies_to(None),
            "no route name: only a policy for all routes"
        );
        assert!(!list(&[]).applies_to(Some("orders")));
    }

    #[test]
    fn the_first_covering_policy_wins() {
        let policies = vec![list(&["orders"]), list(&["search", "orders"]), None];
        let index = |route| first(&policies, route, |p| p).map(|(i, _)| i);
        assert_eq!(index(Some("orders")), Some(0));
        assert_eq!(index(Some("search")), Some(1));
        assert_eq!(index(Some("other")), Some(2));
        assert_eq!(index(None), Some(2));
        assert_eq!(first(&policies[..2], None, |p| p).map(|(i, _)| i), None);
        assert!(any_listed(&policies, |p| p));
        assert!(!any_listed(&policies[2..], |p| p));
    }
}
