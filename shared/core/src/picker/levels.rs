//! The picker: an endpoint set split into priority levels, each with its ring, Maglev table or
//! balancer state, plus the health, panic and priority rules of [`super::select`].
//!
//! Endpoints are kept in a canonical order, by priority then address, without duplicate
//! addresses (the first, lowest-priority one is kept). A [`Pick::Host`] index refers to that
//! order ([`Picker::endpoints`]), and so does the `in_flight` slice passed to a pick.
//!
//! Rings and tables are built over *all* endpoints of a level, healthy or not; health is applied
//! at pick time by walking on past unusable owners. A health change therefore costs no rebuild
//! and moves only the keys of the endpoint that changed. [`Picker::update`] with a new endpoint
//! set rebuilds only the levels whose addresses or weights changed.

use alloc::vec::Vec;

use super::balancer::{least_request, RoundRobin, SmoothWeighted};
use super::bounded::BalanceFactor;
use super::maglev::{MaglevTable, TableSize};
use super::peak_ewma::{self, EndpointLatency, PeakEwmaParams};
use super::ring::{Ring, RingParams};
use super::select::{LevelHealth, PanicThreshold, PriorityLoad};
use super::{Endpoint, Pick};
use crate::rand::Rng;
use crate::time::Instant;

/// How a picker chooses among a level's endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// A consistent-hash ring with virtual nodes ([`super::ring`]).
    Ring(RingParams),
    /// A Maglev table ([`super::maglev`]).
    Maglev(TableSize),
    /// Round robin over usable endpoints, no key.
    RoundRobin,
    /// Smooth weighted round robin, no key.
    Weighted,
    /// Least request by the power of two choices, no key.
    LeastRequest,
    /// Peak-EWMA latency times load by the power of two choices ([`super::peak_ewma`]), no
    /// key: picked with [`Picker::pick_by_latency`]; [`Picker::pick`] falls back to least
    /// request.
    PeakEwma(PeakEwmaParams),
}

impl Algorithm {
    /// Whether the algorithm maps a request key to an endpoint.
    pub fn uses_key(&self) -> bool {
        matches!(self, Algorithm::Ring(_) | Algorithm::Maglev(_))
    }
}

/// The tunables of a picker beside its algorithm.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PickerOptions {
    /// Under this healthy fraction a level picks among all its endpoints (when the levels
    /// together cannot carry the load).
    pub panic_threshold: PanicThreshold,
    /// Bounded loads for the hashing algorithms; `None`: unbounded.
    pub balance_factor: Option<BalanceFactor>,
}

/// How a level finds an endpoint.
#[derive(Clone, Debug)]
enum Lookup {
    Ring(Ring),
    Maglev(MaglevTable),
    None,
}

impl Lookup {
    fn build(algorithm: &Algorithm, members: &[(&str, u32)]) -> Lookup {
        match algorithm {
            Algorithm::Ring(params) => Lookup::Ring(Ring::build(members, *params)),
            Algorithm::Maglev(size) => Lookup::Maglev(MaglevTable::build(members, *size)),
            _ => Lookup::None,
        }
    }
}

/// One priority level: a range of the canonical endpoint list and its lookup state.
#[derive(Clone, Debug)]
struct Level {
    priority: u8,
    start: usize,
    len: usize,
    lookup: Lookup,
    weights: Vec<u32>,
    round_robin: RoundRobin,
    weighted: SmoothWeighted,
}

/// The endpoints a [`Picker::block`] made unhealthy, to give back to [`Picker::unblock`].
#[derive(Debug, Default, PartialEq, Eq)]
#[must_use = "give it back to Picker::unblock"]
pub struct Blocked(Vec<usize>);

/// Picks endpoints for requests; see the module docs.
#[derive(Clone, Debug)]
pub struct Picker {
    algorithm: Algorithm,
    options: PickerOptions,
    endpoints: Vec<Endpoint>,
    levels: Vec<Level>,
    load: PriorityLoad,
}

/// `endpoints` by priority then address, duplicate addresses dropped (lowest priority kept).
fn canonical(endpoints: &[Endpoint]) -> Vec<Endpoint> {
    let mut list = endpoints.to_vec();
    list.sort_by(|a, b| (&a.address, a.priority).cmp(&(&b.address, b.priority)));
    list.dedup_by(|later, first| later.address == first.address);
    list.sort_by(|a, b| (a.priority, &a.address).cmp(&(b.priority, &b.address)));
    list
}

impl Picker {
    /// A picker over `endpoints` (any order).
    pub fn new(algorithm: Algorithm, options: PickerOptions, endpoints: &[Endpoint]) -> Picker {
        let mut picker = Picker {
            algorithm,
            options,
            endpoints: Vec::new(),
            levels: Vec::new(),
            load: PriorityLoad::default(),
        };
        picker.update(endpoints);
        picker
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The endpoints in canonical order: what [`Pick::Host`] indexes.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// Replaces the endpoint set. Levels whose addresses and weights are unchanged keep their
    /// ring or table (only health is taken from `endpoints`); the others are rebuilt. Returns
    /// how many levels were built afresh (0 when only health changed).
    pub fn update(&mut self, endpoints: &[Endpoint]) -> usize {
        let endpoints = canonical(endpoints);
        let mut old_levels = core::mem::take(&mut self.levels);
        let mut levels = Vec::new();
        let mut built = 0;
        let mut start = 0;
        while let Some(first) = endpoints.get(start) {
            let priority = first.priority;
            let len = endpoints
                .get(start..)
                .unwrap_or(&[])
                .iter()
                .take_while(|e| e.priority == priority)
                .count();
            let members = endpoints.get(start..start + len).unwrap_or(&[]);
            let reused = old_levels
                .iter()
                .position(|l| l.priority == priority && self.same_members(l, members))
                .map(|i| old_levels.swap_remove(i));
            let level = match reused {
                Some(old) => Level { start, ..old },
                None => {
                    built += 1;
                    let pairs: Vec<(&str, u32)> = members
                        .iter()
                        .map(|e| (e.address.as_str(), e.weight))
                        .collect();
                    Level {
                        priority,
                        start,
                        len,
                        lookup: Lookup::build(&self.algorithm, &pairs),
                        weights: members.iter().map(|e| e.weight).collect(),
                        round_robin: RoundRobin::default(),
                        weighted: SmoothWeighted::default(),
                    }
                }
            };
            levels.push(level);
            start += len.max(1);
        }
        self.endpoints = endpoints;
        self.levels = levels;
        self.recompute_load();
        built
    }

    /// Whether `level` (of the current endpoint list) has exactly the addresses and weights of
    /// `members`.
    fn same_members(&self, level: &Level, members: &[Endpoint]) -> bool {
        let old = self
            .endpoints
            .get(level.start..level.start + level.len)
            .unwrap_or(&[]);
        old.len() == members.len()
            && old
                .iter()
                .zip(members)
                .all(|(a, b)| a.address == b.address && a.weight == b.weight)
    }

    /// Marks the endpoint at `address` healthy or not; `false` when there is none.
    pub fn set_healthy(&mut self, address: &str, healthy: bool) -> bool {
        let Some(e) = self.endpoints.iter_mut().find(|e| e.address == address) else {
            return false;
        };
        e.healthy = healthy;
        self.recompute_load();
        true
    }

    fn recompute_load(&mut self) {
        let health: Vec<LevelHealth> = self
            .levels
            .iter()
            .map(|l| {
                let eps = self.endpoints.get(l.start..l.start + l.len).unwrap_or(&[]);
                LevelHealth {
                    healthy: eps.iter().filter(|e| e.healthy).count(),
                    total: eps.len(),
                }
            })
            .collect();
        self.load = PriorityLoad::compute(&health, self.options.panic_threshold);
    }

    /// Whether the level of the endpoint at index `i` (of [`Picker::endpoints`]) is in panic:
    /// a pick there may have gone to an unhealthy endpoint.
    pub fn in_panic_at(&self, i: usize) -> bool {
        self.levels
            .iter()
            .position(|l| (l.start..l.start + l.len).contains(&i))
            .is_some_and(|li| self.load.in_panic(li))
    }

    /// Whether any level is in panic.
    pub fn any_in_panic(&self) -> bool {
        (0..self.levels.len()).any(|li| self.load.in_panic(li))
    }

    /// The current share of picks per priority level, in priority order.
    pub fn priority_load(&self) -> &PriorityLoad {
        &self.load
    }

    /// Picks an endpoint. `key` is the request's key hash ([`super::hash_key`] or
    /// [`super::KeyHash`]); hashing algorithms without a key pick at random, as Envoy does.
    /// `in_flight[i]` is the number of requests in flight to endpoint `i` (see
    /// [`super::bounded::InFlight::loads`]); missing entries count as 0. Balancers ignore the
    /// key.
    pub fn pick(&mut self, key: Option<u64>, in_flight: &[u32], rng: &mut impl Rng) -> Pick {
        if self.algorithm.uses_key() {
            let hash = key.unwrap_or_else(|| rng.next_u64());
            return self.pick_hash(hash, in_flight);
        }
        let algorithm = self.algorithm;
        self.pick_in_level(rng, |level, usable, rng| match algorithm {
            Algorithm::RoundRobin => level.round_robin.pick(level.len, usable),
            Algorithm::Weighted => level.weighted.pick(&level.weights, usable),
            _ => {
                let loads = in_flight.get(level.start..).unwrap_or(&[]);
                least_request(rng, &level.weights, loads, usable)
            }
        })
    }

    /// Picks by peak-EWMA cost ([`peak_ewma::pick_by`]) at `now`: a priority level as
    /// [`Picker::pick`] chooses it, then of two usable endpoints of it drawn at random the
    /// cheaper. `latency(i)` gives endpoint `i`'s (of [`Picker::endpoints`]) estimate and load;
    /// it is asked for the two drawn endpoints only. The parameters are those of
    /// [`Algorithm::PeakEwma`] (the defaults for another algorithm).
    pub fn pick_by_latency(
        &mut self,
        now: Instant,
        rng: &mut impl Rng,
        mut latency: impl FnMut(usize) -> EndpointLatency,
    ) -> Pick {
        let params = match self.algorithm {
            Algorithm::PeakEwma(params) => params,
            _ => PeakEwmaParams::default(),
        };
        self.pick_in_level(rng, |level, usable, rng| {
            let start = level.start;
            peak_ewma::pick_by(rng, &params, now, level.len, usable, |i| latency(start + i))
        })
    }

    /// Chooses a priority level by the priority load, then an endpoint of it with `choose`
    /// (given the level, which of its endpoints are usable, by local index, and `rng`).
    fn pick_in_level<R: Rng>(
        &mut self,
        rng: &mut R,
        choose: impl FnOnce(&mut Level, &dyn Fn(usize) -> bool, &mut R) -> Option<usize>,
    ) -> Pick {
        let Some(li) = self.load.choose(rng.below(100)) else {
            return Pick::NoHost;
        };
        let panic = self.load.in_panic(li);
        let Some(level) = self.levels.get_mut(li) else {
            return Pick::NoHost;
        };
        let eps = self
            .endpoints
            .get(level.start..level.start + level.len)
            .unwrap_or(&[]);
        let usable = |i: usize| panic || eps.get(i).is_some_and(|e| e.healthy);
        let local = choose(level, &usable, rng);
        local.map_or(Pick::NoHost, |i| Pick::Host(level.start + i))
    }

    /// Picks the endpoint of key hash `hash` for the hashing algorithms: the owner of its ring
    /// point or table entry, or the next usable one along (skipping unhealthy endpoints unless
    /// the level is in panic, and full endpoints under bounded loads). Balancers give
    /// [`Pick::NoHost`] here.
    pub fn pick_hash(&self, hash: u64, in_flight: &[u32]) -> Pick {
        let Some(li) = self.load.choose(hash) else {
            return Pick::NoHost;
        };
        let Some(level) = self.levels.get(li) else {
            return Pick::NoHost;
        };
        let panic = self.load.in_panic(li);
        let eps = self
            .endpoints
            .get(level.start..level.start + level.len)
            .unwrap_or(&[]);
        let healthy = |i: usize| panic || eps.get(i).is_some_and(|e| e.healthy);
        let load = |i: usize| u64::from(in_flight.get(level.start + i).copied().unwrap_or(0));
        let walk = |usable: &dyn Fn(usize) -> bool| -> Option<usize> {
            match &level.lookup {
                Lookup::Ring(ring) => ring.walk(hash).map(|o| o as usize).find(|&o| usable(o)),
                Lookup::Maglev(table) => table.walk(hash).map(|o| o as usize).find(|&o| usable(o)),
                Lookup::None => None,
            }
        };
        let found = match self.options.balance_factor {
            None => walk(&healthy),
            Some(factor) => {
                let (mut total_load, mut total_weight) = (0u64, 0u64);
                for (i, e) in eps.iter().enumerate() {
                    if healthy(i) {
                        total_load += load(i);
                        total_weight += u64::from(e.weight.max(1));
                    }
                }
                let has_room = |i: usize| {
                    healthy(i)
                        && eps.get(i).is_some_and(|e| {
                            load(i) < factor.cap(total_load, e.weight, total_weight)
                        })
                };
                // Some usable endpoint always has room (see `bounded`); the plain walk is a
                // guard for an endpoint that owns no ring point or table entry.
                walk(&has_room).or_else(|| walk(&healthy))
            }
        };
        found.map_or(Pick::NoHost, |i| Pick::Host(level.start + i))
    }

    /// Counts the endpoints at the indexes `blocked` (of [`Picker::endpoints`]) as unhealthy
    /// until [`Picker::unblock`] is given what this returns: how the glue skips hosts whose
    /// breaker is open for one request. A blocked endpoint is skipped like an ejected one:
    /// only its keys move, and it counts against the panic threshold (a level in panic picks
    /// among all its endpoints, blocked ones too). Blocking nothing costs nothing.
    pub fn block(&mut self, blocked: &[usize]) -> Blocked {
        let mut changed: Vec<usize> = Vec::new();
        for &i in blocked {
            if let Some(e) = self.endpoints.get_mut(i) {
                if e.healthy {
                    e.healthy = false;
                    changed.push(i);
                }
            }
        }
        if !changed.is_empty() {
            self.recompute_load();
        }
        Blocked(changed)
    }

    /// Gives the endpoints [`Picker::block`] blocked their health back.
    pub fn unblock(&mut self, blocked: Blocked) {
        if blocked.0.is_empty() {
            return;
        }
        for i in blocked.0 {
            if let Some(e) = self.endpoints.get_mut(i) {
                e.healthy = true;
            }
        }
        self.recompute_load();
    }

    /// Runs `f` with the endpoints at `blocked` blocked ([`Picker::block`]), then unblocks
    /// them.
    pub fn avoiding<R>(&mut self, blocked: &[usize], f: impl FnOnce(&mut Picker) -> R) -> R {
        let b = self.block(blocked);
        let out = f(self);
        self.unblock(b);
        out
    }

    /// The request's preference list: `first` (the endpoint the pick gave), then the endpoints
    /// a failover should try next, distinct, at most `limit` in all. For the hashing
    /// algorithms, the next distinct usable owners along the ring or table from the key's hash
    /// `hash` (the walk [`Picker::pick_hash`] makes), so the order depends only on the key and
    /// the endpoint set; for the balancers, the level's usable endpoints after `first` in
    /// order (whom the balancer would pick next). Then the other levels' usable endpoints by
    /// priority, in the same way. Usable: healthy, or any in a level in panic.
    pub fn preference(&self, first: usize, hash: Option<u64>, limit: usize) -> Vec<usize> {
        let mut list: Vec<usize> = Vec::new();
        if first >= self.endpoints.len() || limit == 0 {
            return list;
        }
        list.push(first);
        let home = self
            .levels
            .iter()
            .position(|l| (l.start..l.start + l.len).contains(&first));
        let order = home
            .into_iter()
            .chain((0..self.levels.len()).filter(|&li| Some(li) != home));
        for li in order {
            let Some(level) = self.levels.get(li) else {
                continue;
            };
            let panic = self.load.in_panic(li);
            let eps = self
                .endpoints
                .get(level.start..level.start + level.len)
                .unwrap_or(&[]);
            let usable = |i: usize| panic || eps.get(i).is_some_and(|e| e.healthy);
            let mut add = |local: usize, list: &mut Vec<usize>| {
                let i = level.start + local;
                if usable(local) && !list.contains(&i) {
                    list.push(i);
                }
                list.len() >= limit
            };
            let wanted = eps.len();
            let walked = match (&level.lookup, hash) {
                (Lookup::Ring(ring), Some(h)) => {
                    let mut owners = ring.walk(h).map(|o| o as usize);
                    walk_distinct(&mut owners, wanted, &mut list, &mut add)
                }
                (Lookup::Maglev(table), Some(h)) => {
                    let mut owners = table.walk(h).map(|o| o as usize);
                    walk_distinct(&mut owners, wanted, &mut list, &mut add)
                }
                _ => {
                    let after = first.checked_sub(level.start).filter(|&l| l < eps.len());
                    let start = after.map_or(0, |l| l + 1);
                    let mut owners = (0..eps.len()).map(|k| (start + k) % eps.len().max(1));
                    walk_distinct(&mut owners, wanted, &mut list, &mut add)
                }
            };
            if walked {
                break;
            }
        }
        list
    }
}

/// Feeds the distinct owners of `owners` to `add` until `add` says the list is full (returns
/// true) or all `wanted` distinct owners were seen.
fn walk_distinct(
    owners: &mut dyn Iterator<Item = usize>,
    wanted: usize,
    list: &mut Vec<usize>,
    add: &mut dyn FnMut(usize, &mut Vec<usize>) -> bool,
) -> bool {
    let mut met: Vec<usize> = Vec::new();
    for o in owners {
        if met.contains(&o) {
            continue;
        }
        met.push(o);
        if add(o, list) {
            return true;
        }
        if met.len() >= wanted {
            break;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::picker::testing::{addresses, keys};
    use crate::picker::{hash_key, BalanceFactor};
    use crate::rand::SeededRng;
    use alloc::string::String;
    use alloc::vec;

    fn endpoints(addrs: &[String]) -> Vec<Endpoint> {
        addrs.iter().map(|a| Endpoint::new(a.clone())).collect()
    }

    fn ring() -> Algorithm {
        Algorithm::Ring(RingParams::default())
    }

    fn maglev() -> Algorithm {
        Algorithm::Maglev(TableSize::default())
    }

    fn host(p: Pick) -> usize {
        match p {
            Pick::Host(i) => i,
            Pick::NoHost => panic!("no host"),
        }
    }

    #[test]
    fn order_of_the_input_does_not_matter() {
        let mut eps = endpoints(&addresses(10));
        let a = Picker::new(maglev(), PickerOptions::default(), &eps);
        eps.reverse();
        eps.push(Endpoint::new(eps[0].address.clone()));
        let b = Picker::new(maglev(), PickerOptions::default(), &eps);
        assert_eq!(b.endpoints().len(), 10);
        for k in keys().into_iter().take(1000) {
            let (x, y) = (host(a.pick_hash(k, &[])), host(b.pick_hash(k, &[])));
            assert_eq!(a.endpoints()[x].address, b.endpoints()[y].address);
        }
    }

    fn unhealthy_moves_only_its_keys(algorithm: Algorithm) {
        let eps = endpoints(&addresses(10));
        let mut picker = Picker::new(algorithm, PickerOptions::default(), &eps);
        let keys = keys();
        let before: Vec<usize> = keys
            .iter()
            .map(|&k| host(picker.pick_hash(k, &[])))
            .collect();
        let sick = 3;
        assert!(picker.set_healthy(&picker.endpoints()[sick].address.clone(), false));
        let mut moved = 0;
        let mut took = vec![0usize; 10];
        for (&k, &was) in keys.iter().zip(&before) {
            let now = host(picker.pick_hash(k, &[]));
            assert_ne!(now, sick, "an unhealthy endpoint was picked");
            if now != was {
                assert_eq!(was, sick, "a key of a healthy endpoint moved");
                moved += 1;
                took[now] += 1;
            }
        }
        assert_eq!(moved, before.iter().filter(|&&w| w == sick).count());
        // Its keys spread over the others rather than all landing on one neighbour.
        assert!(took.iter().filter(|&&t| t > 0).count() >= 8, "{took:?}");
        // Healthy again: every key is back.
        picker.set_healthy(&picker.endpoints()[sick].address.clone(), true);
        for (&k, &was) in keys.iter().zip(&before).take(1000) {
            assert_eq!(host(picker.pick_hash(k, &[])), was);
        }
    }

    #[test]
    fn ring_skips_an_unhealthy_endpoint_and_moves_only_its_keys() {
        unhealthy_moves_only_its_keys(ring());
    }

    #[test]
    fn maglev_skips_an_unhealthy_endpoint_and_moves_only_its_keys() {
        unhealthy_moves_only_its_keys(maglev());
    }

    #[test]
    fn below_the_panic_threshold_every_endpoint_is_used() {
        let mut eps = endpoints(&addresses(10));
        for e in eps.iter_mut().take(6) {
            e.healthy = false;
        }
        let picker = Picker::new(ring(), PickerOptions::default(), &eps);
        assert!(picker.priority_load().in_panic(0));
        assert!(picker.any_in_panic() && picker.in_panic_at(9) && !picker.in_panic_at(10));
        let mut used = [false; 10];
        for k in keys().into_iter().take(2000) {
            used[host(picker.pick_hash(k, &[]))] = true;
        }
        assert!(
            used.iter().all(|u| *u),
            "panic mode uses unhealthy endpoints too"
        );
        // At 5 of 10 healthy (not under 50 %) only healthy ones are used.
        eps[5].healthy = true;
        let picker = Picker::new(ring(), PickerOptions::default(), &eps);
        assert!(!picker.priority_load().in_panic(0));
        for k in keys().into_iter().take(2000) {
            assert!(picker.endpoints()[host(picker.pick_hash(k, &[]))].healthy);
        }
        // Panic disabled and nothing healthy: no host.
        for e in &mut eps {
            e.healthy = false;
        }
        let off = PickerOptions {
            panic_threshold: PanicThreshold::new(0.0).unwrap(),
            ..PickerOptions::default()
        };
        let picker = Picker::new(ring(), off, &eps);
        assert_eq!(picker.pick_hash(1, &[]), Pick::NoHost);
        let empty = Picker::new(ring(), PickerOptions::default(), &[]);
        assert_eq!(empty.pick_hash(1, &[]), Pick::NoHost);
    }

    #[test]
    fn priority_one_takes_over_as_priority_zero_fails() {
        let mut eps = endpoints(&addresses(10));
        for e in eps.iter_mut().skip(5) {
            e.priority = 1;
        }
        let mut picker = Picker::new(maglev(), PickerOptions::default(), &eps);
        let share_of_p1 = |p: &Picker| {
            let keys = keys();
            let n = keys
                .iter()
                .take(20_000)
                .filter(|&&k| p.endpoints()[host(p.pick_hash(k, &[]))].priority == 1);
            n.count() as f64 / 20_000.0
        };
        assert_eq!(share_of_p1(&picker), 0.0);
        // One of five down: 140 % × 4/5 > 100 %, nothing moves.
        let addr = |p: &Picker, i: usize| p.endpoints()[i].address.clone();
        picker.set_healthy(&addr(&picker, 0), false);
        assert_eq!(share_of_p1(&picker), 0.0);
        // Three of five down: 56 % stays, 44 % goes to priority 1.
        picker.set_healthy(&addr(&picker, 1), false);
        picker.set_healthy(&addr(&picker, 2), false);
        let s = share_of_p1(&picker);
        assert!((s - 0.44).abs() < 0.02, "priority 1 took {s}");
        // All down: everything on priority 1.
        picker.set_healthy(&addr(&picker, 3), false);
        picker.set_healthy(&addr(&picker, 4), false);
        assert_eq!(share_of_p1(&picker), 1.0);
        // A key that stays on priority 0 keeps its endpoint.
        picker.set_healthy(&addr(&picker, 0), true);
        picker.set_healthy(&addr(&picker, 1), true);
        picker.set_healthy(&addr(&picker, 2), true);
        picker.set_healthy(&addr(&picker, 3), true);
        picker.set_healthy(&addr(&picker, 4), true);
        assert_eq!(share_of_p1(&picker), 0.0);
    }

    fn bounded_loads_respect_the_cap(algorithm: Algorithm) {
        let eps = endpoints(&addresses(10));
        let factor = BalanceFactor::new(1.25).unwrap();
        let options = PickerOptions {
            balance_factor: Some(factor),
            ..PickerOptions::default()
        };
        let picker = Picker::new(algorithm, options, &eps);
        let mut rng = SeededRng::new(3);
        let mut in_flight = vec![0u32; 10];
        // A hot key (one tenth of the traffic) among random ones, with requests ending at
        // random: the hot key's endpoint fills up and must pass keys on.
        let hot = hash_key(b"hot");
        let hot_home = host(picker.pick_hash(hot, &[]));
        let mut passed_on = 0;
        for step in 0..20_000u64 {
            let key = if step % 10 == 0 { hot } else { rng.next_u64() };
            let total: u64 = in_flight.iter().map(|&n| u64::from(n)).sum();
            let i = host(picker.pick_hash(key, &in_flight));
            let cap = factor.cap(total, 1, 10);
            assert!(
                u64::from(in_flight[i]) < cap,
                "endpoint {i} was full at step {step}"
            );
            if key == hot && i != hot_home {
                passed_on += 1;
            }
            in_flight[i] += 1;
            if step >= 100 {
                // Keep about 100 requests in flight: end one at random.
                let busy: Vec<usize> = (0..10).filter(|&j| in_flight[j] > 0).collect();
                let j = busy[rng.below(busy.len() as u64) as usize];
                in_flight[j] -= 1;
            }
        }
        assert!(passed_on > 0, "the hot key never overflowed");
        // Same loads, same key: same endpoint, and the pass-on follows the walk.
        let mut full = vec![0u32; 10];
        full[hot_home] = 50;
        let a = host(picker.pick_hash(hot, &full));
        assert_ne!(a, hot_home);
        assert_eq!(a, host(picker.pick_hash(hot, &full)));
    }

    #[test]
    fn ring_bounded_loads_never_exceed_the_cap() {
        bounded_loads_respect_the_cap(ring());
    }

    #[test]
    fn maglev_bounded_loads_never_exceed_the_cap() {
        bounded_loads_respect_the_cap(maglev());
    }

    #[test]
    fn update_keeps_unchanged_levels_and_rebuilds_changed_ones() {
        let mut eps = endpoints(&addresses(4));
        eps[3].priority = 1;
        let mut picker = Picker::new(ring(), PickerOptions::default(), &eps);
        let before: Vec<usize> = keys()
            .into_iter()
            .take(1000)
            .map(|k| host(picker.pick_hash(k, &[])))
            .collect();
        // Health alone rebuilds nothing.
        eps[1].healthy = false;
        assert_eq!(picker.update(&eps), 0);
        assert!(!picker.endpoints()[1].healthy);
        eps[1].healthy = true;
        eps.push(Endpoint {
            priority: 1,
            ..Endpoint::new("10.9.9.9:80")
        });
        assert_eq!(picker.update(&eps), 1, "only priority 1 is rebuilt");
        assert_eq!(picker.endpoints().len(), 5);
        let after: Vec<usize> = keys()
            .into_iter()
            .take(1000)
            .map(|k| host(picker.pick_hash(k, &[])))
            .collect();
        assert_eq!(before, after, "priority 0 is unchanged and takes all keys");
        let zero = Picker::new(
            maglev(),
            PickerOptions::default(),
            &[Endpoint {
                weight: 0,
                ..Endpoint::new("10.0.0.1:1")
            }],
        );
        assert_eq!(zero.pick_hash(9, &[]), Pick::Host(0));
    }

    /// The preference list is where the key goes as its hosts drop out: entry 1 is the pick
    /// once entry 0 is unhealthy, entry 2 once both are.
    fn preference_follows_the_failover_walk(algorithm: Algorithm) {
        let eps = endpoints(&addresses(5));
        let picker = Picker::new(algorithm, PickerOptions::default(), &eps);
        for k in keys().into_iter().take(2000) {
            let first = host(picker.pick_hash(k, &[]));
            let list = picker.preference(first, Some(k), 8);
            assert_eq!(list.len(), 5, "every endpoint, once");
            assert_eq!(list[0], first);
            let mut sorted = list.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 5);
            let mut down = picker.clone();
            for (n, &gone) in list.iter().take(2).enumerate() {
                down.set_healthy(&eps_address(&picker, gone), false);
                assert_eq!(host(down.pick_hash(k, &[])), list[n + 1]);
            }
            // And the list of the degraded picker is the rest, in the same order.
            let rest = down.preference(list[2], Some(k), 8);
            assert_eq!(rest, list[2..]);
            assert_eq!(picker.preference(first, Some(k), 2), list[..2]);
        }
    }

    fn eps_address(p: &Picker, i: usize) -> String {
        p.endpoints()[i].address.clone()
    }

    #[test]
    fn ring_preference_follows_the_failover_walk() {
        preference_follows_the_failover_walk(ring());
    }

    #[test]
    fn maglev_preference_follows_the_failover_walk() {
        preference_follows_the_failover_walk(maglev());
    }

    #[test]
    fn preference_lists_are_the_same_in_every_picker_of_the_same_set() {
        let mut eps = endpoints(&addresses(6));
        let a = Picker::new(ring(), PickerOptions::default(), &eps);
        eps.reverse();
        let b = Picker::new(ring(), PickerOptions::default(), &eps);
        for k in keys().into_iter().take(500) {
            let names = |p: &Picker| -> Vec<String> {
                let first = host(p.pick_hash(k, &[]));
                p.preference(first, Some(k), 8)
                    .into_iter()
                    .map(|i| eps_address(p, i))
                    .collect()
            };
            assert_eq!(names(&a), names(&b));
        }
    }

    #[test]
    fn blocked_hosts_are_skipped_like_unhealthy_ones_and_come_back() {
        let eps = endpoints(&addresses(10));
        let mut picker = Picker::new(ring(), PickerOptions::default(), &eps);
        let keys: Vec<u64> = keys().into_iter().take(5000).collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|&k| host(picker.pick_hash(k, &[])))
            .collect();
        let blocked = 4;
        let during: Vec<usize> = picker.avoiding(&[blocked], |p| {
            keys.iter().map(|&k| host(p.pick_hash(k, &[]))).collect()
        });
        for ((&was, &now), &k) in before.iter().zip(&during).zip(&keys) {
            assert_ne!(now, blocked);
            if was != blocked {
                assert_eq!(now, was, "a key of another host moved");
            } else {
                // It went to the next host of its preference list.
                assert_eq!(now, picker.preference(was, Some(k), 2)[1]);
            }
        }
        assert!(picker.endpoints()[blocked].healthy, "health restored");
        let after: Vec<usize> = keys
            .iter()
            .map(|&k| host(picker.pick_hash(k, &[])))
            .collect();
        assert_eq!(before, after);
        // The panic threshold still applies: with most hosts blocked the level picks among all.
        let most: Vec<usize> = (0..8).collect();
        let in_panic = picker.avoiding(&most, |p| p.any_in_panic());
        assert!(in_panic);
        assert!(!picker.any_in_panic());
    }

    #[test]
    fn balancer_preference_is_the_next_picks() {
        let eps = endpoints(&addresses(4));
        let mut rr = Picker::new(Algorithm::RoundRobin, PickerOptions::default(), &eps);
        rr.set_healthy(&eps[2].address, false);
        assert_eq!(rr.preference(1, None, 8), vec![1, 3, 0]);
        assert_eq!(rr.preference(3, None, 2), vec![3, 0]);
        assert_eq!(rr.preference(9, None, 8), Vec::<usize>::new());
        // Priority levels: the home level first, then the next.
        let mut eps = endpoints(&addresses(4));
        eps[2].priority = 1;
        eps[3].priority = 1;
        let p = Picker::new(ring(), PickerOptions::default(), &eps);
        for k in keys().into_iter().take(200) {
            let first = host(p.pick_hash(k, &[]));
            let list = p.preference(first, Some(k), 8);
            assert_eq!(list.len(), 4);
            assert!(list[..2].iter().all(|&i| p.endpoints()[i].priority == 0));
        }
    }

    #[test]
    fn balancers_pick_through_the_picker() {
        let mut eps = endpoints(&addresses(3));
        eps[0].weight = 2;
        let mut rng = SeededRng::new(5);
        let mut rr = Picker::new(Algorithm::RoundRobin, PickerOptions::default(), &eps);
        let picks: Vec<Pick> = (0..4).map(|_| rr.pick(None, &[], &mut rng)).collect();
        assert_eq!(
            picks,
            vec![Pick::Host(0), Pick::Host(1), Pick::Host(2), Pick::Host(0)]
        );
        assert_eq!(rr.pick_hash(1, &[]), Pick::NoHost);
        let mut w = Picker::new(Algorithm::Weighted, PickerOptions::default(), &eps);
        let mut counts = [0usize; 3];
        for _ in 0..400 {
            counts[host(w.pick(None, &[], &mut rng))] += 1;
        }
        assert_eq!(counts, [200, 100, 100]);
        let mut lr = Picker::new(Algorithm::LeastRequest, PickerOptions::default(), &eps);
        lr.set_healthy(&eps[0].address, false);
        for _ in 0..50 {
            // 0 is unhealthy; of 1 and 2, 2 is idle.
            assert_eq!(lr.pick(Some(1), &[0, 5, 0], &mut rng), Pick::Host(2));
        }
        // Peak EWMA: of the usable endpoints, the one with the lower latency cost; without
        // latencies (Picker::pick) it is least request.
        let params = PeakEwmaParams::default();
        let mut pe = Picker::new(Algorithm::PeakEwma(params), PickerOptions::default(), &eps);
        pe.set_healthy(&eps[0].address, false);
        let now = Instant::from_nanos(1_000_000);
        let measured = |ms: u64| EndpointLatency {
            estimate_ns: (ms * 1_000_000) as f64,
            stamp: Some(now),
            in_flight: 0,
        };
        let latencies = [measured(1), measured(80), measured(5)];
        for _ in 0..50 {
            let got = pe.pick_by_latency(now, &mut rng, |i| latencies[i]);
            assert_eq!(got, Pick::Host(2), "1 ms is unhealthy; 5 ms beats 80 ms");
            assert_eq!(pe.pick(None, &[0, 5, 0], &mut rng), Pick::Host(2));
        }
        // Priority levels apply as for the other balancers: level 1 only when 0 is down.
        let mut eps2 = endpoints(&addresses(3));
        eps2[2].priority = 1;
        let mut pe = Picker::new(Algorithm::PeakEwma(params), PickerOptions::default(), &eps2);
        for _ in 0..50 {
            assert_ne!(
                pe.pick_by_latency(now, &mut rng, |i| latencies[i]),
                Pick::Host(2)
            );
        }
        pe.set_healthy(&eps2[0].address, false);
        pe.set_healthy(&eps2[1].address, false);
        assert_eq!(
            pe.pick_by_latency(now, &mut rng, |i| latencies[i]),
            Pick::Host(2)
        );
        // Hashing pickers without a key pick at random, but still a usable endpoint.
        let mut h = Picker::new(ring(), PickerOptions::default(), &eps);
        h.set_healthy(&eps[1].address, false);
        for _ in 0..50 {
            assert_ne!(h.pick(None, &[], &mut rng), Pick::Host(1));
        }
    }
}
