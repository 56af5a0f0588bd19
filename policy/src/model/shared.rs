//! One copy of each pod part that pods have alike: label sets (the replicas of a ReplicaSet,
//! the pods of one app in every namespace) and container port lists. The identities the
//! compiler makes of pods share them too. A set of two labels is a tree node and four strings,
//! some 700 bytes; a cluster has many pods and far fewer label sets.
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use super::NamedPort;

pub type LabelSet = BTreeMap<String, String>;

/// `labels`, as the one shared copy of that set.
pub fn label_set(labels: LabelSet) -> Arc<LabelSet> {
    static SETS: Dedup<LabelSet> = Dedup::new();
    SETS.get(labels)
}

/// `ports` (sorted), as the one shared copy of that list.
pub fn named_ports(ports: Vec<NamedPort>) -> Arc<Vec<NamedPort>> {
    static LISTS: Dedup<Vec<NamedPort>> = Dedup::new();
    LISTS.get(ports)
}

/// Values by content, held weakly: a value no one holds any more is dropped.
struct Dedup<T> {
    cache: LazyLock<Mutex<Cache<T>>>,
}

struct Cache<T> {
    hasher: RandomState,
    /// Digest -> the values with it that may still be alive.
    values: HashMap<u64, Vec<Weak<T>>>,
    /// Entries, and how many were alive at the last sweep.
    entries: usize,
    alive_at_sweep: usize,
}

impl<T> Default for Cache<T> {
    fn default() -> Self {
        Cache {
            hasher: RandomState::new(),
            values: HashMap::new(),
            entries: 0,
            alive_at_sweep: 0,
        }
    }
}

impl<T: Hash + Eq> Dedup<T> {
    const fn new() -> Self {
        Dedup {
            cache: LazyLock::new(|| Mutex::new(Cache::default())),
        }
    }

    fn get(&self, value: T) -> Arc<T> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let digest = cache.hasher.hash_one(&value);
        let bucket = cache.values.entry(digest).or_default();
        if let Some(found) = bucket
            .iter()
            .find_map(|w| w.upgrade().filter(|v| **v == value))
        {
            return found;
        }
        let value = Arc::new(value);
        bucket.push(Arc::downgrade(&value));
        cache.entries += 1;
        // Values no one holds any more go when the cache has doubled since its last sweep.
        if cache.entries > 2 * cache.alive_at_sweep.max(1024) {
            cache.values.retain(|_, b| {
                b.retain(|w| w.strong_count() > 0);
                !b.is_empty()
            });
            cache.entries = cache.values.values().map(Vec::len).sum();
            cache.alive_at_sweep = cache.entries;
        }
        value
    }

    #[cfg(test)]
    fn entries(&self) -> usize {
        self.cache.lock().unwrap().entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_are_one_copy_and_unused_ones_go() {
        let d: Dedup<String> = Dedup::new();
        let a = d.get("a".to_string());
        assert!(Arc::ptr_eq(&a, &d.get("a".to_string())));
        let b = d.get("b".to_string());
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!(*b, "b");
        // Thousands of values made and dropped: the cache does not keep them.
        for i in 0..10_000 {
            drop(d.get(format!("gone-{i}")));
        }
        assert!(d.entries() <= 2049, "{} entries kept", d.entries());
        // What is still held is still shared.
        assert!(Arc::ptr_eq(&a, &d.get("a".to_string())));
        assert!(Arc::ptr_eq(&b, &d.get("b".to_string())));
    }
}
