//! Triton's response cache (`--cache-config local,size=N` on the server, `response_cache {
//! enable: true }` in a model's config): a request whose model, version, inputs (name,
//! type, shape, bytes) and requested outputs equal an earlier successful one's gets that
//! one's outputs without running the model. One cache serves every model, bounded in
//! bytes; the least recently used entries leave first. As in Triton, sequence and decoupled
//! models and ensembles themselves are not cached.
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::request::{InferRequest, Produced};

/// A request's place in the cache, kept on a request that missed so that its response
/// can be inserted.
#[derive(Debug, Clone, Copy)]
pub struct CacheKey {
    /// The request's hash.
    pub key: u64,
    /// How long the lookup took.
    pub lookup: Duration,
}

/// Bytes an entry is charged beyond its tensors' data (names, shapes, bookkeeping).
const ENTRY_OVERHEAD: usize = 64;

/// The server's response cache.
#[derive(Debug)]
pub struct ResponseCache {
    capacity: usize,
    inner: Mutex<Lru>,
}

#[derive(Debug, Default)]
struct Lru {
    entries: HashMap<u64, (Arc<Produced>, u64, usize)>,
    /// Last use → key, oldest first.
    order: BTreeMap<u64, u64>,
    tick: u64,
    bytes: usize,
}

impl ResponseCache {
    /// A cache holding at most `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        ResponseCache {
            capacity,
            inner: Mutex::new(Lru::default()),
        }
    }

    /// The cache tritonserver's `--cache-config` settings describe (`local,size=N`, given
    /// once per key); an error names what is not supported.
    pub fn from_settings(settings: &[String]) -> Result<Option<Self>, String> {
        let mut size = None;
        for s in settings {
            let (cache, kv) = s.split_once(',').ok_or_else(|| {
                format!("--cache-config expects <cache>,<key>=<value>, got '{s}'")
            })?;
            if cache != "local" {
                return Err(format!(
                    "cache '{cache}' is not available in Kiln (supported: local)"
                ));
            }
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                format!("--cache-config expects <cache>,<key>=<value>, got '{s}'")
            })?;
            match k {
                "size" => {
                    size = Some(v.parse::<usize>().map_err(|_| {
                        format!("--cache-config local,size must be a number of bytes, got '{v}'")
                    })?)
                }
                _ => {
                    return Err(format!(
                    "unsupported --cache-config key '{k}' for the local cache (supported: size)"
                ))
                }
            }
        }
        Ok(size.filter(|&n| n > 0).map(ResponseCache::new))
    }

    /// The key of `req` to `model` version `version`.
    pub fn key(model: &str, version: i64, req: &InferRequest) -> u64 {
        let mut h = std::hash::DefaultHasher::new();
        (model, version).hash(&mut h);
        let mut inputs: Vec<_> = req.inputs.iter().collect();
        inputs.sort_by(|a, b| a.name.cmp(&b.name));
        for t in inputs {
            (&t.name, t.dtype as u32, &t.shape, t.data.as_ref()).hash(&mut h);
        }
        let mut outputs: Vec<&str> = req.outputs.iter().map(|o| o.name.as_str()).collect();
        outputs.sort_unstable();
        outputs.hash(&mut h);
        h.finish()
    }

    /// The outputs cached under `key`, if any (which become the most recently used).
    pub fn lookup(&self, key: u64) -> Option<Arc<Produced>> {
        let mut lru = self.lock();
        lru.tick += 1;
        let tick = lru.tick;
        let (produced, old) = {
            let (p, last, _) = lru.entries.get_mut(&key)?;
            let old = std::mem::replace(last, tick);
            (p.clone(), old)
        };
        lru.order.remove(&old);
        lru.order.insert(tick, key);
        Some(produced)
    }

    /// Caches `produced` under `key`, evicting the least recently used entries to make
    /// room; an entry larger than the whole cache is not kept.
    pub fn insert(&self, key: u64, produced: Produced) {
        let size = produced
            .iter()
            .map(|(n, _, s, d)| n.len() + s.len() * 8 + d.len())
            .sum::<usize>()
            + ENTRY_OVERHEAD;
        if size > self.capacity {
            return;
        }
        let mut lru = self.lock();
        if lru.entries.contains_key(&key) {
            return;
        }
        while lru.bytes + size > self.capacity {
            let Some((_, oldest)) = lru.order.pop_first() else {
                break;
            };
            if let Some((_, _, freed)) = lru.entries.remove(&oldest) {
                lru.bytes -= freed;
            }
        }
        lru.tick += 1;
        let tick = lru.tick;
        lru.order.insert(tick, key);
        lru.entries.insert(key, (Arc::new(produced), tick, size));
        lru.bytes += size;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kiln_sdk::DataType;

    fn produced(bytes: usize) -> Produced {
        vec![(
            "o".into(),
            DataType::UInt8,
            vec![bytes as i64],
            vec![7; bytes],
        )]
    }

    #[test]
    fn least_recently_used_entries_leave_first() {
        // Room for two entries of 100 bytes (each is charged its names and shape too).
        let c = ResponseCache::new(2 * (100 + 1 + 8 + ENTRY_OVERHEAD));
        c.insert(1, produced(100));
        c.insert(2, produced(100));
        assert!(c.lookup(1).is_some(), "1 is now the most recent");
        c.insert(3, produced(100));
        assert!(c.lookup(2).is_none(), "2 was the least recently used");
        assert!(c.lookup(1).is_some() && c.lookup(3).is_some());
        c.insert(4, produced(10_000));
        assert!(c.lookup(4).is_none(), "larger than the cache");
        assert!(c.lookup(1).is_some(), "and nothing was evicted for it");
    }

    #[test]
    fn keys_follow_inputs_and_requested_outputs_not_their_order() {
        let mut a = InferRequest::new("m");
        for (n, v) in [("x", 1u8), ("y", 2)] {
            a.inputs.push(crate::request::InputTensor {
                name: n.into(),
                dtype: DataType::UInt8,
                shape: vec![1],
                data: Bytes::from(vec![v]),
            });
        }
        let mut b = a.clone();
        b.inputs.reverse();
        assert_eq!(
            ResponseCache::key("m", 1, &a),
            ResponseCache::key("m", 1, &b)
        );
        assert_ne!(
            ResponseCache::key("m", 1, &a),
            ResponseCache::key("m", 2, &a)
        );
        assert_ne!(
            ResponseCache::key("m", 1, &a),
            ResponseCache::key("n", 1, &a)
        );
        b.inputs[0].data = Bytes::from(vec![9u8]);
        assert_ne!(
            ResponseCache::key("m", 1, &a),
            ResponseCache::key("m", 1, &b)
        );
        let mut c = a.clone();
        c.inputs[0].shape = vec![1, 1];
        assert_ne!(
            ResponseCache::key("m", 1, &a),
            ResponseCache::key("m", 1, &c)
        );
    }

    #[test]
    fn settings_follow_tritonserver() {
        let s = |v: &[&str]| {
            ResponseCache::from_settings(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(
            s(&["local,size=1048576"])
                .expect("valid")
                .map(|c| c.capacity),
            Some(1048576)
        );
        assert!(s(&[]).expect("none").is_none());
        assert!(s(&["redis,host=x"]).unwrap_err().contains("not available"));
        assert!(s(&["local,size=lots"]).is_err());
        assert!(s(&["local,colour=red"])
            .unwrap_err()
            .contains("unsupported"));
    }
}
