//! The scheduler: which agent gets a sandbox, decided atomically.
//!
//! Seed 004's registry scores agents by image affinity first and load second, and refuses
//! agents that are full or already publish a host port the sandbox asks for. Its Go version
//! takes 1.3 µs at 100 agents and 14.6 µs at 1,000: it walks every agent. This one is built
//! to stay near constant time as agents grow (the benchmark in `benches/scheduler.rs`
//! measures it at 100 and 1,000 agents):
//!
//! - Load is kept as one of [`LEVELS`] levels (`used * LEVELS / capacity`; exact for
//!   capacities up to 64, the seed's default is 5), and each level is a bitset of the agents
//!   at it that have room. A bit mask of the non-empty levels finds the least loaded level in
//!   one instruction.
//! - Each backend, image, warm image and pool is a bitset of the agents that have it.
//! - A placement ANDs a level's words with the backend's (and the pool's, and the image's)
//!   and takes the first set bit, in passes: agents with a pre-warmed sandbox of the image
//!   (a pool hit), then agents with the image, then any. Host ports are checked only for the
//!   agent a bit points at; one that conflicts is skipped.
//!
//! An agent at full capacity, or down, is in no level, so it is never chosen. Everything
//! is under the caller's lock ([`crate::nodes::Nodes`]): a placement reserves its slot and
//! ports before the lock is released, so two creates never get the same last slot or port.

use std::collections::{HashMap, HashSet};

use warren_spec::{BackendKind, Protocol};

/// Load levels.
pub const LEVELS: usize = 64;

/// A port published on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub protocol: Protocol,
    pub port: u16,
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

/// What a sandbox needs from an agent.
#[derive(Debug, Clone, Copy)]
pub struct Demand<'a> {
    pub backend: BackendKind,
    /// For affinity: agents that have it (or a pre-warmed sandbox of it) come first.
    pub image: Option<&'a str>,
    /// Host ports it publishes: the agent must have each free.
    pub ports: &'a [HostPort],
    /// Only agents that are members of this pool.
    pub pool: Option<&'a str>,
    /// Another agent than this one if any has room (a re-create after a failure).
    pub avoid: Option<usize>,
}

/// How the agent was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    /// It has a pre-warmed sandbox of the image: a pool hit.
    Warm,
    /// It has the image.
    Image,
    /// Least loaded of the rest.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub agent: usize,
    pub affinity: Affinity,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("no agent that is up can run backend {backend}{}", in_pool(pool))]
    NoAgent {
        backend: BackendKind,
        pool: Option<String>,
    },
    #[error(
        "every agent that can run backend {backend}{} is full ({agents} agents)",
        in_pool(pool)
    )]
    Full {
        backend: BackendKind,
        pool: Option<String>,
        agents: usize,
    },
    #[error("spec.ports: host port {port} is taken on every agent with room ({agents} agents)")]
    PortTaken { port: HostPort, agents: usize },
}

fn in_pool(pool: &Option<String>) -> String {
    pool.as_ref()
        .map(|p| format!(" in pool {p:?}"))
        .unwrap_or_default()
}

impl ScheduleError {
    /// A short, fixed word for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            ScheduleError::NoAgent { .. } => "no_agent",
            ScheduleError::Full { .. } => "capacity",
            ScheduleError::PortTaken { .. } => "port_conflict",
        }
    }
}

#[derive(Debug, Clone)]
struct Slot {
    name: String,
    capacity: u32,
    used: u32,
    up: bool,
    backends: Vec<BackendKind>,
    ports: HashSet<HostPort>,
    images: Vec<String>,
    /// Pre-warmed sandboxes ready, by image.
    warm: HashMap<String, u32>,
    level: Option<usize>,
}

fn backend_index(b: BackendKind) -> usize {
    match b {
        BackendKind::Slot => 0,
        BackendKind::Linux => 1,
        BackendKind::Wasm => 2,
        BackendKind::Vm => 3,
    }
}

fn get(v: &[u64], i: usize) -> bool {
    v.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
}

fn set(v: &mut [u64], i: usize, on: bool) {
    if let Some(w) = v.get_mut(i / 64) {
        if on {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }
}

/// Agents and their load; see the module docs.
#[derive(Debug, Default)]
pub struct Scheduler {
    slots: Vec<Slot>,
    index: HashMap<String, usize>,
    words: usize,
    levels: Vec<Vec<u64>>,
    level_counts: Vec<u32>,
    /// Bit `l` set: level `l` has an agent.
    nonempty: u64,
    backends: [Vec<u64>; 4],
    images: HashMap<String, Vec<u64>>,
    warm: HashMap<String, Vec<u64>>,
    pools: HashMap<String, Vec<u64>>,
    /// All ones for every agent: the "no pool" mask.
    all: Vec<u64>,
}

impl Scheduler {
    pub fn new() -> Self {
        Scheduler {
            levels: vec![Vec::new(); LEVELS],
            level_counts: vec![0; LEVELS],
            ..Default::default()
        }
    }

    fn grow(&mut self) {
        self.words += 1;
        let words = self.words;
        for v in self
            .levels
            .iter_mut()
            .chain(self.backends.iter_mut())
            .chain(self.images.values_mut())
            .chain(self.warm.values_mut())
            .chain(self.pools.values_mut())
        {
            v.resize(words, 0);
        }
        self.all.resize(words, 0);
    }

    /// The agent's index, adding it (down, empty) if it is new.
    pub fn agent(&mut self, name: &str) -> usize {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        let i = self.slots.len();
        if i / 64 >= self.words {
            self.grow();
        }
        self.slots.push(Slot {
            name: name.to_string(),
            capacity: 0,
            used: 0,
            up: false,
            backends: Vec::new(),
            ports: HashSet::new(),
            images: Vec::new(),
            warm: HashMap::new(),
            level: None,
        });
        set(&mut self.all, i, true);
        self.index.insert(name.to_string(), i);
        i
    }

    pub fn find(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    pub fn name(&self, i: usize) -> &str {
        self.slots.get(i).map_or("", |s| s.name.as_str())
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Sandboxes placed on the agent, and its capacity.
    pub fn load(&self, i: usize) -> (u32, u32) {
        self.slots.get(i).map_or((0, 0), |s| (s.used, s.capacity))
    }

    /// Host ports the agent publishes for its sandboxes.
    pub fn ports(&self, i: usize) -> Vec<HostPort> {
        let mut p: Vec<HostPort> = self
            .slots
            .get(i)
            .map(|s| s.ports.iter().copied().collect())
            .unwrap_or_default();
        p.sort_by_key(|p| (p.port, p.protocol as u8));
        p
    }

    fn relevel(&mut self, i: usize) {
        let Some(slot) = self.slots.get(i) else {
            return;
        };
        let new = (slot.up && slot.used < slot.capacity)
            .then(|| (u64::from(slot.used) * LEVELS as u64 / u64::from(slot.capacity)) as usize);
        let old = slot.level;
        if old == new {
            return;
        }
        if let Some(l) = old {
            set(&mut self.levels[l], i, false);
            self.level_counts[l] -= 1;
            if self.level_counts[l] == 0 {
                self.nonempty &= !(1 << l);
            }
        }
        if let Some(l) = new {
            set(&mut self.levels[l], i, true);
            self.level_counts[l] += 1;
            self.nonempty |= 1 << l;
        }
        self.slots[i].level = new;
    }

    /// Sets what the agent offers: its capacity and the backends it can run.
    pub fn configure(&mut self, i: usize, capacity: u32, backends: &[BackendKind]) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        slot.capacity = capacity;
        let old = std::mem::replace(&mut slot.backends, backends.to_vec());
        for b in old {
            set(&mut self.backends[backend_index(b)], i, false);
        }
        for &b in backends {
            set(&mut self.backends[backend_index(b)], i, true);
        }
        self.relevel(i);
    }

    /// Marks the agent up (schedulable) or down (lost, or not yet registered).
    pub fn set_up(&mut self, i: usize, up: bool) {
        if let Some(slot) = self.slots.get_mut(i) {
            slot.up = up;
        }
        self.relevel(i);
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.slots.get(i).is_some_and(|s| s.up)
    }

    /// The images the agent has (image affinity).
    pub fn set_images(&mut self, i: usize, images: &[String]) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        if slot.images == images {
            return;
        }
        let old = std::mem::replace(&mut slot.images, images.to_vec());
        for image in old {
            if let Some(v) = self.images.get_mut(&image) {
                set(v, i, false);
            }
        }
        let words = self.words;
        for image in images {
            let v = self
                .images
                .entry(image.clone())
                .or_insert_with(|| vec![0; words]);
            set(v, i, true);
        }
    }

    /// Pre-warmed sandboxes ready on the agent, by image.
    pub fn set_warm(&mut self, i: usize, warm: &[(String, u32)]) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        let old = std::mem::take(&mut slot.warm);
        for image in old.keys() {
            if let Some(v) = self.warm.get_mut(image) {
                set(v, i, false);
            }
        }
        let words = self.words;
        for (image, ready) in warm {
            if *ready == 0 {
                continue;
            }
            slot.warm.insert(image.clone(), *ready);
            let v = self
                .warm
                .entry(image.clone())
                .or_insert_with(|| vec![0; words]);
            set(v, i, true);
        }
    }

    /// Pre-warmed sandboxes of `image` the scheduler counts on agent `i` now.
    pub fn warm_of(&self, i: usize, image: &str) -> u32 {
        self.slots
            .get(i)
            .and_then(|s| s.warm.get(image).copied())
            .unwrap_or(0)
    }

    /// Which agents are members of `pool`; `None` removes the pool.
    pub fn set_pool(&mut self, pool: &str, members: Option<&[usize]>) {
        match members {
            None => {
                self.pools.remove(pool);
            }
            Some(members) => {
                let mut v = vec![0; self.words];
                for &i in members {
                    set(&mut v, i, true);
                }
                self.pools.insert(pool.to_string(), v);
            }
        }
    }

    /// Places a sandbox: reserves a slot and its ports on the chosen agent.
    pub fn allocate(&mut self, d: &Demand<'_>) -> Result<Placement, ScheduleError> {
        match self.place(d) {
            Ok(p) => Ok(p),
            Err(e) if d.avoid.is_some() => self.place(&Demand { avoid: None, ..*d }).map_err(|_| e),
            Err(e) => Err(e),
        }
    }

    fn place(&mut self, d: &Demand<'_>) -> Result<Placement, ScheduleError> {
        let (i, affinity) = self.search(d)?;
        Ok(self.take_placement(i, d, affinity))
    }

    /// The agent a placement would take, without taking it.
    fn search(&self, d: &Demand<'_>) -> Result<(usize, Affinity), ScheduleError> {
        let backend = &self.backends[backend_index(d.backend)];
        let pool = match d.pool {
            Some(p) => match self.pools.get(p) {
                Some(v) => v,
                None => {
                    return Err(ScheduleError::NoAgent {
                        backend: d.backend,
                        pool: Some(p.to_string()),
                    });
                }
            },
            None => &self.all,
        };
        let warm = d.image.and_then(|i| self.warm.get(i));
        let image = d.image.and_then(|i| self.images.get(i));
        let passes = [
            (warm, Affinity::Warm),
            (image, Affinity::Image),
            (Some(&self.all), Affinity::None),
        ];
        let mut port_conflicts = 0usize;
        let mut first_conflict = None;
        for (prefer, affinity) in passes {
            let Some(prefer) = prefer else { continue };
            let mut levels = self.nonempty;
            while levels != 0 {
                let l = levels.trailing_zeros() as usize;
                levels &= levels - 1;
                let level = &self.levels[l];
                for w in 0..self.words {
                    let mut bits = level[w] & backend[w] & pool[w] & prefer[w];
                    if let Some(a) = d.avoid
                        && a / 64 == w
                    {
                        bits &= !(1 << (a % 64));
                    }
                    while bits != 0 {
                        let i = w * 64 + bits.trailing_zeros() as usize;
                        bits &= bits - 1;
                        let slot = &self.slots[i];
                        match d.ports.iter().find(|p| slot.ports.contains(p)) {
                            None => return Ok((i, affinity)),
                            Some(p) => {
                                if affinity == Affinity::None {
                                    port_conflicts += 1;
                                }
                                first_conflict.get_or_insert(*p);
                            }
                        }
                    }
                }
            }
        }
        let pool_name = d.pool.map(str::to_string);
        // Those that could ever take it: a server with `--local-capacity 0` runs nothing
        // itself and is no agent that is full.
        let agents = (0..self.slots.len())
            .filter(|&i| {
                self.slots[i].up && self.slots[i].capacity > 0 && get(backend, i) && get(pool, i)
            })
            .count();
        Err(match first_conflict {
            Some(port) => ScheduleError::PortTaken {
                port,
                agents: port_conflicts,
            },
            None if agents == 0 => ScheduleError::NoAgent {
                backend: d.backend,
                pool: pool_name,
            },
            None => ScheduleError::Full {
                backend: d.backend,
                pool: pool_name,
                agents,
            },
        })
    }

    fn take_placement(&mut self, i: usize, d: &Demand<'_>, affinity: Affinity) -> Placement {
        self.take(i, d.ports);
        if affinity == Affinity::Warm
            && let Some(image) = d.image
        {
            let slot = &mut self.slots[i];
            // The shell will be claimed: the next create should not count on it.
            let left = slot.warm.get(image).copied().unwrap_or(0).saturating_sub(1);
            if left == 0 {
                slot.warm.remove(image);
                if let Some(v) = self.warm.get_mut(image) {
                    set(v, i, false);
                }
            } else {
                slot.warm.insert(image.to_string(), left);
            }
        }
        Placement { agent: i, affinity }
    }

    /// Counts a sandbox on the agent whatever its room (one it already runs, found at
    /// recovery).
    pub fn take(&mut self, i: usize, ports: &[HostPort]) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        slot.used += 1;
        slot.ports.extend(ports.iter().copied());
        self.relevel(i);
    }

    /// Gives back what [`Scheduler::allocate`] or [`Scheduler::take`] reserved.
    pub fn release(&mut self, i: usize, ports: &[HostPort]) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        slot.used = slot.used.saturating_sub(1);
        for p in ports {
            slot.ports.remove(p);
        }
        self.relevel(i);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn demand(image: Option<&str>) -> Demand<'_> {
        Demand {
            backend: BackendKind::Slot,
            image,
            ports: &[],
            pool: None,
            avoid: None,
        }
    }

    fn agents(n: usize, capacity: u32) -> Scheduler {
        let mut s = Scheduler::new();
        for k in 0..n {
            let i = s.agent(&format!("a{k}"));
            s.configure(i, capacity, &[BackendKind::Slot, BackendKind::Wasm]);
            s.set_up(i, true);
        }
        s
    }

    #[test]
    fn least_loaded_first_and_never_over_capacity() {
        let mut s = agents(3, 2);
        let mut got = Vec::new();
        for _ in 0..6 {
            got.push(s.allocate(&demand(None)).unwrap().agent);
        }
        // Spread: each agent once before any gets a second.
        assert_eq!(&got[..3], &[0, 1, 2]);
        assert_eq!(&got[3..], &[0, 1, 2]);
        let e = s.allocate(&demand(None)).unwrap_err();
        assert_eq!(
            e,
            ScheduleError::Full {
                backend: BackendKind::Slot,
                pool: None,
                agents: 3
            }
        );
        s.release(1, &[]);
        assert_eq!(s.allocate(&demand(None)).unwrap().agent, 1);
    }

    /// An agent of capacity 0 (a server with `--local-capacity 0`) is not counted as one
    /// that is full; with only such agents, none can run the backend.
    #[test]
    fn agents_without_capacity_are_not_full_ones() {
        let mut s = agents(3, 1);
        s.configure(0, 0, &[BackendKind::Slot, BackendKind::Wasm]);
        for _ in 0..2 {
            s.allocate(&demand(None)).unwrap();
        }
        let e = s.allocate(&demand(None)).unwrap_err();
        assert!(matches!(e, ScheduleError::Full { agents: 2, .. }), "{e:?}");
        let mut none = agents(1, 0);
        let e = none.allocate(&demand(None)).unwrap_err();
        assert!(matches!(e, ScheduleError::NoAgent { .. }), "{e:?}");
    }

    #[test]
    fn image_affinity_beats_load_and_warm_beats_image() {
        let mut s = agents(3, 10);
        s.set_images(2, &["py".into()]);
        for _ in 0..5 {
            let p = s.allocate(&demand(Some("py"))).unwrap();
            assert_eq!((p.agent, p.affinity), (2, Affinity::Image));
        }
        // Without the image: least loaded.
        assert_eq!(s.allocate(&demand(Some("go"))).unwrap().agent, 0);
        s.set_warm(1, &[("py".into(), 1)]);
        let p = s.allocate(&demand(Some("py"))).unwrap();
        assert_eq!((p.agent, p.affinity), (1, Affinity::Warm));
        // The one warm sandbox is taken: back to image affinity.
        assert_eq!(s.allocate(&demand(Some("py"))).unwrap().agent, 2);
        // Full agents lose their affinity.
        for _ in 0..4 {
            s.allocate(&demand(Some("py"))).unwrap();
        }
        assert_eq!(s.load(2), (10, 10));
        assert_ne!(s.allocate(&demand(Some("py"))).unwrap().agent, 2);
    }

    #[test]
    fn host_ports_are_never_given_twice_on_an_agent() {
        let mut s = agents(2, 10);
        let port = [HostPort {
            protocol: Protocol::Tcp,
            port: 8080,
        }];
        let d = Demand {
            ports: &port,
            ..demand(None)
        };
        let a = s.allocate(&d).unwrap().agent;
        let b = s.allocate(&d).unwrap().agent;
        assert_ne!(a, b);
        let e = s.allocate(&d).unwrap_err();
        assert!(
            matches!(e, ScheduleError::PortTaken { agents: 2, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("8080/tcp"), "{e}");
        // UDP 8080 is another port.
        let udp = [HostPort {
            protocol: Protocol::Udp,
            port: 8080,
        }];
        s.allocate(&Demand {
            ports: &udp,
            ..demand(None)
        })
        .unwrap();
        s.release(a, &port);
        assert_eq!(s.allocate(&d).unwrap().agent, a);
    }

    #[test]
    fn backends_pools_down_agents_and_avoid() {
        let mut s = agents(3, 10);
        let linux = Demand {
            backend: BackendKind::Linux,
            ..demand(None)
        };
        assert!(matches!(
            s.allocate(&linux),
            Err(ScheduleError::NoAgent { .. })
        ));
        s.configure(2, 10, &[BackendKind::Linux]);
        assert_eq!(s.allocate(&linux).unwrap().agent, 2);
        s.set_pool("p", Some(&[1]));
        let pooled = Demand {
            pool: Some("p"),
            ..demand(None)
        };
        for _ in 0..3 {
            assert_eq!(s.allocate(&pooled).unwrap().agent, 1);
        }
        let e = s
            .allocate(&Demand {
                pool: Some("nope"),
                ..demand(None)
            })
            .unwrap_err();
        assert!(e.to_string().contains("in pool \"nope\""), "{e}");
        s.set_up(0, false);
        assert_eq!(s.allocate(&demand(None)).unwrap().agent, 1);
        let avoid = Demand {
            avoid: Some(1),
            pool: Some("p"),
            ..demand(None)
        };
        // The only member: taken anyway.
        assert_eq!(s.allocate(&avoid).unwrap().agent, 1);
    }

    #[test]
    fn many_agents_grow_the_bitsets() {
        let mut s = agents(1000, 5);
        s.set_images(999, &["img".into()]);
        assert_eq!(s.allocate(&demand(Some("img"))).unwrap().agent, 999);
        for _ in 0..4999 {
            s.allocate(&demand(None)).unwrap();
        }
        assert!((0..1000).all(|i| s.load(i) == (5, 5)));
        assert!(s.allocate(&demand(None)).is_err());
    }
}
