//! A map that remembers which keys it changed lately, so that the compiler looks again at
//! those alone instead of digesting every pod and policy on every update.
//!
//! Reading goes through `Deref` to the `BTreeMap`; every way to change it is a method here that
//! records the key (or, for a change of everything, forgets the journal), so no change can go
//! unseen. A consumer remembers the `Mark` it read up to; `changes_since` answers `None` when it
//! cannot list everything since then (another map, a clone, a journal that overflowed), and the
//! consumer scans the whole map as before.
use std::borrow::Borrow;
use std::collections::{BTreeMap, VecDeque};
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};

/// Keys remembered; past this, the oldest are forgotten (a consumer that far behind scans).
const JOURNAL: usize = 4096;

static ORIGINS: AtomicU64 = AtomicU64::new(1);

/// Where a consumer read a `Tracked` up to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mark {
    origin: u64,
    seq: u64,
}

#[derive(Debug)]
pub struct Tracked<K, V> {
    map: BTreeMap<K, V>,
    /// This map's own (a clone gets another).
    origin: u64,
    /// Changes made so far.
    seq: u64,
    /// The keys of the latest changes, each with the `seq` it made.
    journal: VecDeque<(u64, K)>,
    /// Changes up to this one are not all in `journal`.
    horizon: u64,
}

impl<K: Ord + Clone, V> Tracked<K, V> {
    /// Where the map is now.
    pub fn mark(&self) -> Mark {
        Mark {
            origin: self.origin,
            seq: self.seq,
        }
    }

    /// The keys changed since `mark` (inserted, replaced, touched mutably or removed; some
    /// more than once), or `None` if they cannot all be named.
    pub fn changes_since(&self, mark: Mark) -> Option<impl Iterator<Item = &K>> {
        if mark.origin != self.origin || mark.seq < self.horizon || mark.seq > self.seq {
            return None;
        }
        let start = self.journal.partition_point(|(s, _)| *s <= mark.seq);
        Some(self.journal.range(start..).map(|(_, k)| k))
    }

    fn record(&mut self, key: &K) {
        self.seq += 1;
        if self.journal.len() == JOURNAL
            && let Some((s, _)) = self.journal.pop_front()
        {
            self.horizon = s;
        }
        self.journal.push_back((self.seq, key.clone()));
    }

    /// Every key may have changed.
    fn forget(&mut self) {
        self.seq += 1;
        self.horizon = self.seq;
        self.journal.clear();
    }

    pub fn insert(&mut self, key: K, value: impl Into<V>) -> Option<V> {
        self.record(&key);
        self.map.insert(key, value.into())
    }

    pub fn remove<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let (k, v) = self.map.remove_entry(key)?;
        self.record(&k);
        Some(v)
    }

    /// Counted as a change whether or not the caller changes it.
    pub fn get_mut<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        let k = self.map.get_key_value(key)?.0.clone();
        self.record(&k);
        self.map.get_mut(key)
    }

    pub fn values_mut(&mut self) -> std::collections::btree_map::ValuesMut<'_, K, V> {
        self.forget();
        self.map.values_mut()
    }

    pub fn retain(&mut self, f: impl FnMut(&K, &mut V) -> bool) {
        self.forget();
        self.map.retain(f);
    }

    /// Makes the map hold exactly `next`, recording only the keys whose value differs.
    pub fn sync(&mut self, next: Tracked<K, V>)
    where
        V: PartialEq,
    {
        let gone: Vec<K> = self
            .map
            .keys()
            .filter(|k| !next.map.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            self.remove(&k);
        }
        for (k, v) in next.map {
            if self.map.get(&k) != Some(&v) {
                self.insert(k, v);
            }
        }
    }

    pub fn clear(&mut self) {
        self.forget();
        self.map.clear();
    }
}

impl<K: Ord + Clone, V: Clone> Tracked<K, std::sync::Arc<V>> {
    /// `get_mut` of a shared value: copied first if another holds it too.
    pub fn make_mut<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        self.get_mut(key).map(std::sync::Arc::make_mut)
    }
}

impl<K, V> Default for Tracked<K, V> {
    fn default() -> Self {
        Tracked {
            map: BTreeMap::new(),
            origin: ORIGINS.fetch_add(1, Ordering::Relaxed),
            seq: 0,
            journal: VecDeque::new(),
            horizon: 0,
        }
    }
}

impl<K: Clone, V: Clone> Clone for Tracked<K, V> {
    /// Another map: its consumers start with a scan.
    fn clone(&self) -> Self {
        Tracked {
            map: self.map.clone(),
            ..Tracked::default()
        }
    }
}

impl<K, V> Deref for Tracked<K, V> {
    type Target = BTreeMap<K, V>;
    fn deref(&self) -> &BTreeMap<K, V> {
        &self.map
    }
}

impl<'a, K, V> IntoIterator for &'a Tracked<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = std::collections::btree_map::Iter<'a, K, V>;
    fn into_iter(self) -> Self::IntoIter {
        self.map.iter()
    }
}

impl<K: Ord + Clone, V> FromIterator<(K, V)> for Tracked<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Tracked {
            map: iter.into_iter().collect(),
            ..Tracked::default()
        }
    }
}

impl<K: PartialEq, V: PartialEq> PartialEq for Tracked<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn since(t: &Tracked<u32, u32>, m: Mark) -> Option<Vec<u32>> {
        t.changes_since(m).map(|i| i.copied().collect())
    }

    #[test]
    fn every_change_is_named_until_the_journal_overflows() {
        let mut t: Tracked<u32, u32> = Tracked::default();
        t.insert(1, 1u32);
        let m = t.mark();
        assert_eq!(since(&t, m), Some(vec![]));
        t.insert(2, 2u32);
        *t.get_mut(&1).unwrap() = 5;
        assert!(t.get_mut(&9).is_none());
        t.remove(&2);
        t.remove(&7);
        assert_eq!(since(&t, m), Some(vec![2, 1, 2]));
        // Another map's mark, a clone, a change of everything: a scan.
        assert_eq!(since(&t, Tracked::<u32, u32>::default().mark()), None);
        let c = t.clone();
        assert_eq!(since(&c, m), None);
        let m2 = t.mark();
        t.values_mut().for_each(|v| *v += 1);
        assert_eq!(since(&t, m2), None);
        let m3 = t.mark();
        for k in 0..JOURNAL as u32 {
            t.insert(k, k);
        }
        assert_eq!(since(&t, m3).map(|v| v.len()), Some(JOURNAL));
        t.insert(0, 0u32);
        assert_eq!(since(&t, m3), None, "the oldest change is forgotten");
        let m4 = t.mark();
        t.insert(3, 3u32);
        assert_eq!(since(&t, m4), Some(vec![3]));
    }
}
