//! Text substitutions on an Envoy YAML before it runs.
//!
//! The configs in `envoy/` use fixed ports so that they run as written; a test moves them to
//! free ports. A port is rewritten only where it is a whole number in one of the two forms the
//! configs use, `port_value: N` and `127.0.0.1:N`, so `10000` never touches `100001` and a
//! status code or a timeout that happens to equal a port is left alone.

use std::collections::BTreeMap;

/// The prefixes after which a number is a port.
const PORT_FORMS: [&str; 2] = ["port_value:", "127.0.0.1:"];

/// Rewrites every port of `map` (fixed → new) in one pass, so that chains such as 10000 → 18080
/// and 18080 → 40000 do not compose. Returns the new text and the ports of `map` that occur.
pub(crate) fn remap_ports(text: &str, map: &BTreeMap<u16, u16>) -> (String, Vec<u16>) {
    let mut out = String::with_capacity(text.len());
    let mut found = Vec::new();
    let mut rest = text;
    while let Some((at, form)) = next_form(rest) {
        let after_form = at + form.len();
        out.push_str(&rest[..after_form]);
        rest = &rest[after_form..];
        let spaces = rest.len() - rest.trim_start_matches([' ', '\t']).len();
        // `127.0.0.1:` is followed directly by the port; `port_value:` by spaces first.
        let spaces = if form == PORT_FORMS[1] { 0 } else { spaces };
        out.push_str(&rest[..spaces]);
        rest = &rest[spaces..];
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let number = &rest[..digits];
        match number
            .parse::<u16>()
            .ok()
            .and_then(|n| map.get(&n).map(|to| (n, to)))
        {
            Some((from, to)) => {
                out.push_str(&to.to_string());
                if !found.contains(&from) {
                    found.push(from);
                }
            }
            None => out.push_str(number),
        }
        rest = &rest[digits..];
    }
    out.push_str(rest);
    (out, found)
}

/// The earliest port form in `text`: its byte offset and which form.
fn next_form(text: &str) -> Option<(usize, &'static str)> {
    PORT_FORMS
        .iter()
        .filter_map(|form| text.find(form).map(|at| (at, *form)))
        .min_by_key(|(at, _)| *at)
}

/// Whether `port` occurs in `text` in a port form.
pub(crate) fn mentions_port(text: &str, port: u16) -> bool {
    let map = BTreeMap::from([(port, port)]);
    !remap_ports(text, &map).1.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaps_both_forms_and_whole_numbers_only() {
        let text = "port_value: 10000\nport_value:  18080 }\nhost: \"127.0.0.1:18080\"\n\
                    port_value: 100001\nstatus: 10000\n127.0.0.1:180801";
        let map = BTreeMap::from([(10000, 4000), (18080, 5000)]);
        let (out, found) = remap_ports(text, &map);
        assert_eq!(
            out,
            "port_value: 4000\nport_value:  5000 }\nhost: \"127.0.0.1:5000\"\n\
             port_value: 100001\nstatus: 10000\n127.0.0.1:180801"
        );
        assert_eq!(found, vec![10000, 18080]);
    }

    #[test]
    fn chains_do_not_compose() {
        let map = BTreeMap::from([(10000, 18080), (18080, 4000)]);
        let (out, _) = remap_ports("port_value: 10000 port_value: 18080", &map);
        assert_eq!(out, "port_value: 18080 port_value: 4000");
    }

    #[test]
    fn finds_mentions() {
        assert!(mentions_port("a: 127.0.0.1:9901", 9901));
        assert!(!mentions_port("a: 127.0.0.1:99011", 9901));
        assert!(!mentions_port("port_value: ", 9901));
    }
}
