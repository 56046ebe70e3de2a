//! Triton's rate limiter (`--rate-limit=execution_count`): a model instance runs a batch only
//! once the resources its instance group's `rate_limiter` lists are free, and holds them
//! until its execute returns.
//!
//! A resource is per device (each device has its own copies) or `global` (one pool). By
//! default a resource has as many copies as the largest count any loaded instance asks
//! for; `--rate-limit-resource=<name>:<count>[:<device>]` sets them instead, and then a
//! resource it does not name has none, so a model asking for it fails to load. Among
//! instances waiting to run, the one with the fewest executions weighted by its
//! `priority` goes first (priority 2 gets half the turns of priority 1), and it alone may
//! take resources, so a large request is not starved by smaller ones.
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use kiln_proto::inference::ModelRateLimiter;

use crate::error::CoreError;

/// Where a resource's copies live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// One pool for the whole server.
    Global,
    /// Copies per device.
    Device(i32),
}

/// A `--rate-limit-resource` value: `count` copies of `name` on `device` (every device
/// when `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplicitResource {
    /// Resource name.
    pub name: String,
    /// Copies.
    pub count: u64,
    /// The device they are on; `None` for every device.
    pub device: Option<i32>,
}

impl std::str::FromStr for ExplicitResource {
    type Err = String;

    /// Parses `<name>:<count>[:<device>]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid --rate-limit-resource '{s}': expected <resource_name>:<count>[:<device>]"
            )
        };
        let parts: Vec<&str> = s.split(':').collect();
        let (name, count, device) = match parts.as_slice() {
            [n, c] => (*n, *c, None),
            [n, c, d] => (*n, *c, Some(d.parse::<i32>().map_err(|_| bad())?)),
            _ => return Err(bad()),
        };
        if name.is_empty() {
            return Err(bad());
        }
        Ok(ExplicitResource {
            name: name.to_string(),
            count: count.parse().map_err(|_| bad())?,
            device,
        })
    }
}

type Key = (Scope, String);

#[derive(Debug)]
struct Member {
    needs: Vec<(Key, u64)>,
    priority: u64,
    executions: u64,
}

#[derive(Debug, Default)]
struct State {
    members: HashMap<u64, Member>,
    next_id: u64,
    capacity: HashMap<Key, u64>,
    in_use: HashMap<Key, u64>,
    /// Waiting members: (id, arrival number).
    waiting: Vec<(u64, u64)>,
    arrivals: u64,
}

impl State {
    /// Copies of every resource, from the members' needs and the explicit counts.
    fn compute_capacity(
        &self,
        explicit: &[ExplicitResource],
    ) -> Result<HashMap<Key, u64>, CoreError> {
        let mut cap: HashMap<Key, u64> = HashMap::new();
        for m in self.members.values() {
            for (k, n) in &m.needs {
                let c = cap.entry(k.clone()).or_default();
                *c = (*c).max(*n);
            }
        }
        for (scope, name) in cap.keys() {
            if *scope == Scope::Global && cap.keys().any(|(s, n)| n == name && *s != Scope::Global)
            {
                return Err(CoreError::invalid(format!(
                    "Resource \"{name}\" is present as both global and device-specific resource in the model configuration."
                )));
            }
        }
        if explicit.is_empty() {
            return Ok(cap);
        }
        for ((scope, name), need) in cap.iter_mut() {
            let given = explicit
                .iter()
                .filter(|e| {
                    &e.name == name
                        && match scope {
                            Scope::Global => true,
                            Scope::Device(d) => e.device.is_none() || e.device == Some(*d),
                        }
                })
                .map(|e| e.count)
                .max()
                .unwrap_or(0);
            if given < *need {
                return Err(CoreError::invalid(format!(
                    "Resource count for \"{name}\" is limited to {given} which will prevent scheduling of one or more model instances, the minimum required count is {need}"
                )));
            }
            *need = given;
        }
        Ok(cap)
    }

    fn fits(&self, id: u64) -> bool {
        self.members.get(&id).is_none_or(|m| {
            m.needs.iter().all(|(k, n)| {
                self.in_use.get(k).copied().unwrap_or(0) + n
                    <= self.capacity.get(k).copied().unwrap_or(0)
            })
        })
    }

    /// The waiting member that goes next: fewest weighted executions, then the earliest.
    fn first_waiting(&self) -> Option<u64> {
        self.waiting
            .iter()
            .min_by_key(|(id, arrival)| {
                let score = self
                    .members
                    .get(id)
                    .map_or(0, |m| m.executions.saturating_mul(m.priority));
                (score, *arrival)
            })
            .map(|(id, _)| *id)
    }
}

/// The server's rate limiter, shared by every model instance.
#[derive(Debug, Default)]
pub struct RateLimiter {
    explicit: Vec<ExplicitResource>,
    state: Mutex<State>,
    turn: Condvar,
}

impl RateLimiter {
    /// A limiter with the `--rate-limit-resource` counts.
    pub fn new(explicit: Vec<ExplicitResource>) -> Arc<Self> {
        Arc::new(RateLimiter {
            explicit,
            ..Default::default()
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an instance on `device` with its group's `rate_limiter` settings. Fails (and
    /// adds nothing) when the resources could never be granted.
    pub fn register(
        self: &Arc<Self>,
        config: Option<&ModelRateLimiter>,
        device: i32,
    ) -> Result<Seat, CoreError> {
        let needs = config
            .map(|c| {
                c.resources
                    .iter()
                    .map(|r| {
                        let scope = if r.global {
                            Scope::Global
                        } else {
                            Scope::Device(device)
                        };
                        ((scope, r.name.clone()), u64::from(r.count))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let priority = u64::from(config.map_or(1, |c| c.priority.max(1)));
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.members.insert(
            id,
            Member {
                needs,
                priority,
                executions: 0,
            },
        );
        match st.compute_capacity(&self.explicit) {
            Ok(cap) => {
                st.capacity = cap;
                Ok(Seat {
                    limiter: self.clone(),
                    id,
                })
            }
            Err(e) => {
                st.members.remove(&id);
                Err(e)
            }
        }
    }

    fn unregister(&self, id: u64) {
        let mut st = self.lock();
        st.members.remove(&id);
        st.waiting.retain(|(w, _)| *w != id);
        if let Ok(cap) = st.compute_capacity(&self.explicit) {
            st.capacity = cap;
        }
        drop(st);
        self.turn.notify_all();
    }

    /// Blocks until member `id` may run, then takes its resources.
    fn acquire(&self, id: u64) {
        let mut st = self.lock();
        let arrival = st.arrivals;
        st.arrivals += 1;
        st.waiting.push((id, arrival));
        while !(st.first_waiting() == Some(id) && st.fits(id)) {
            st = self.turn.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.waiting.retain(|(w, _)| *w != id);
        let needs = st
            .members
            .get(&id)
            .map(|m| m.needs.clone())
            .unwrap_or_default();
        for (k, n) in needs {
            *st.in_use.entry(k).or_default() += n;
        }
        drop(st);
        // The next waiter may fit beside this one.
        self.turn.notify_all();
    }

    fn release(&self, id: u64) {
        let mut st = self.lock();
        if let Some(m) = st.members.get_mut(&id) {
            m.executions += 1;
            let needs = m.needs.clone();
            for (k, n) in needs {
                if let Some(u) = st.in_use.get_mut(&k) {
                    *u = u.saturating_sub(n);
                }
            }
        }
        drop(st);
        self.turn.notify_all();
    }

    /// The copies each resource has now: (scope, name, count), sorted.
    pub fn capacities(&self) -> Vec<(Scope, String, u64)> {
        let mut v: Vec<_> = self
            .lock()
            .capacity
            .iter()
            .map(|((s, n), c)| (*s, n.clone(), *c))
            .collect();
        v.sort();
        v
    }
}

/// One model instance's place in the rate limiter; leaves it when dropped.
#[derive(Debug)]
pub struct Seat {
    limiter: Arc<RateLimiter>,
    id: u64,
}

impl Seat {
    /// Waits for this instance's turn and resources; they are held until the grant drops.
    pub fn acquire(&self) -> Grant<'_> {
        self.limiter.acquire(self.id);
        Grant(self)
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.limiter.unregister(self.id);
    }
}

/// Resources held for one execution.
pub struct Grant<'a>(&'a Seat);

impl Drop for Grant<'_> {
    fn drop(&mut self) {
        self.0.limiter.release(self.0.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::inference::model_rate_limiter::Resource;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn cfg(resources: &[(&str, u32, bool)], priority: u32) -> ModelRateLimiter {
        ModelRateLimiter {
            resources: resources
                .iter()
                .map(|(n, c, g)| Resource {
                    name: n.to_string(),
                    count: *c,
                    global: *g,
                })
                .collect(),
            priority,
        }
    }

    #[test]
    fn parses_resource_flags() {
        let r: ExplicitResource = "R1:10".parse().unwrap();
        assert_eq!((r.name.as_str(), r.count, r.device), ("R1", 10, None));
        let r: ExplicitResource = "R2:5:1".parse().unwrap();
        assert_eq!(r.device, Some(1));
        assert!("R1".parse::<ExplicitResource>().is_err());
        assert!("R1:x".parse::<ExplicitResource>().is_err());
        assert!(":3".parse::<ExplicitResource>().is_err());
    }

    #[test]
    fn default_copies_are_the_largest_need_and_explicit_counts_are_checked() {
        let l = RateLimiter::new(vec![]);
        let _a = l
            .register(Some(&cfg(&[("R1", 4, false), ("R2", 4, false)], 1)), 0)
            .unwrap();
        let _b = l
            .register(Some(&cfg(&[("R2", 5, false), ("G", 10, true)], 1)), 0)
            .unwrap();
        assert_eq!(
            l.capacities(),
            vec![
                (Scope::Global, "G".into(), 10),
                (Scope::Device(0), "R1".into(), 4),
                (Scope::Device(0), "R2".into(), 5)
            ]
        );
        let e = l
            .register(Some(&cfg(&[("G", 1, false)], 1)), 0)
            .unwrap_err();
        assert!(
            e.message.contains("both global and device-specific"),
            "{}",
            e.message
        );

        let l = RateLimiter::new(vec!["R1:3".parse().unwrap(), "R1:8:1".parse().unwrap()]);
        let _a = l.register(Some(&cfg(&[("R1", 3, false)], 1)), 0).unwrap();
        let _b = l.register(Some(&cfg(&[("R1", 6, false)], 1)), 1).unwrap();
        let e = l
            .register(Some(&cfg(&[("R1", 4, false)], 1)), 0)
            .unwrap_err();
        assert_eq!(
            e.message,
            "Resource count for \"R1\" is limited to 3 which will prevent scheduling of one or more model instances, the minimum required count is 4"
        );
        let e = l
            .register(Some(&cfg(&[("OTHER", 1, false)], 1)), 0)
            .unwrap_err();
        assert!(e.message.contains("is limited to 0"), "{}", e.message);
        // A refused instance leaves nothing behind.
        assert_eq!(l.capacities().len(), 2);
    }

    #[test]
    fn resources_bound_how_many_instances_run_at_once() {
        let l = RateLimiter::new(vec!["R:2".parse().unwrap()]);
        let members: Vec<_> = (0..4)
            .map(|_| Arc::new(l.register(Some(&cfg(&[("R", 1, false)], 1)), 0).unwrap()))
            .collect();
        let running = Arc::new(AtomicU64::new(0));
        let most = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = members
            .iter()
            .map(|m| {
                let (m, running, most) = (m.clone(), running.clone(), most.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let _g = m.acquire();
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        running.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(most.load(Ordering::SeqCst) <= 2);
    }

    #[test]
    fn priority_weights_the_turns() {
        let l = RateLimiter::new(vec![]);
        let one = l.register(Some(&cfg(&[("R", 1, false)], 1)), 0).unwrap();
        let two = l.register(Some(&cfg(&[("R", 1, false)], 2)), 0).unwrap();
        // Both wait after some runs: the lower count weighted by priority goes first.
        for _ in 0..3 {
            drop(one.acquire());
        }
        drop(two.acquire());
        // one: 3 executions × 1 = 3; two: 1 × 2 = 2, so `two` is first in line.
        let mut s = l.lock();
        s.waiting = vec![(one.id, 0), (two.id, 1)];
        assert_eq!(s.first_waiting(), Some(two.id));
        s.members.get_mut(&two.id).unwrap().executions = 2;
        assert_eq!(s.first_waiting(), Some(one.id));
        s.waiting.clear();
    }
}
