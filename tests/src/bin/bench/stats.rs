//! Figures (repeated measurements), percentiles and the JSON tree they go into.
use serde_json::{Map, Value, json};

/// One figure measured `samples.len()` times in the same run.
#[derive(Clone, Debug, Default)]
pub struct Figure {
    pub samples: Vec<f64>,
}

impl Figure {
    pub fn new(samples: Vec<f64>) -> Figure {
        Figure { samples }
    }

    pub fn push(&mut self, v: f64) {
        self.samples.push(v);
    }

    pub fn median(&self) -> f64 {
        percentile(&self.samples, 50.0)
    }

    pub fn min(&self) -> f64 {
        self.samples.iter().copied().fold(f64::INFINITY, f64::min)
    }

    pub fn max(&self) -> f64 {
        self.samples
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max)
    }

    /// `{"median", "min", "max", "repeats", "samples"}`.
    pub fn json(&self) -> Value {
        json!({
            "median": round(self.median()),
            "min": round(self.min()),
            "max": round(self.max()),
            "repeats": self.samples.len(),
            "samples": self.samples.iter().map(|v| round(*v)).collect::<Vec<_>>(),
        })
    }
}

/// Rounds to 4 significant decimals, enough for every figure here and readable in JSON.
pub fn round(v: f64) -> f64 {
    if !v.is_finite() {
        return v;
    }
    let scale = if v.abs() >= 100.0 { 100.0 } else { 10_000.0 };
    (v * scale).round() / scale
}

/// Nearest-rank percentile (`p` in 0..=100) of `values`; NaN when empty.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Sets `root.<dotted path>` to `value`, creating objects on the way.
pub fn set(root: &mut Value, path: &str, value: Value) {
    let mut cur = root;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let obj = cur.as_object_mut().expect("object");
        if i + 1 == parts.len() {
            obj.insert(part.to_string(), value);
            return;
        }
        cur = obj
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

/// `root.<dotted path>`, if present.
pub fn get<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(root, |v, part| v.get(part))
}

/// The median of the figure at `path`.
pub fn median_at(root: &Value, path: &str) -> Option<f64> {
    get(root, path)?.get("median")?.as_f64()
}

/// Bytes allocated and not yet freed by this process (the bench's global allocator counts
/// them): the live heap of what the bench builds, to explain the agent's memory.
pub fn heap_bytes() -> usize {
    ALLOCATED.load(std::sync::atomic::Ordering::Relaxed)
}

static ALLOCATED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub struct CountingAllocator;

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is kept.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            ALLOCATED.fetch_add(layout.size(), std::sync::atomic::Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        ALLOCATED.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if !p.is_null() {
            ALLOCATED.fetch_add(layout.size(), std::sync::atomic::Ordering::Relaxed);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new) };
        if !p.is_null() {
            ALLOCATED.fetch_add(new, std::sync::atomic::Ordering::Relaxed);
            ALLOCATED.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_paths() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 3.0);
        assert_eq!(percentile(&v, 99.0), 5.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        let mut root = json!({});
        set(&mut root, "a.b.1", Figure::new(vec![2.0, 1.0, 3.0]).json());
        assert_eq!(median_at(&root, "a.b.1"), Some(2.0));
        assert_eq!(get(&root, "a.b.1.min").and_then(Value::as_f64), Some(1.0));
    }
}
