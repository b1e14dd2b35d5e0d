//! Periodic clean-ups that never hold a lock for long: a map is walked a
//! slice at a time, with a yield between slices, whatever its size.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use indexmap::IndexMap;

/// Entries the sweeper looks at per hold of a lock: a few microseconds' work.
pub const SWEEP_SLICE: usize = 128;

/// What one sweep saw (logged at debug).
#[derive(Debug, Default)]
pub struct Sweep {
    pub examined: usize,
    pub slices: usize,
    pub longest_hold: Duration,
    /// Slices that held their lock for a millisecond or more (on a busy
    /// machine, the thread was preempted while holding it).
    pub slow_holds: usize,
}

/// Removes the entries of `map` that `keep` rejects, `SWEEP_SLICE` entries
/// per hold of its lock with a yield in between, and returns how many it
/// removed. It walks from the last index to the first: a removal moves the
/// last entry (already seen) into the hole, and entries added meanwhile go
/// to the end, so every entry present at the start is seen exactly once and
/// new ones wait for the next sweep. What is removed is dropped outside the
/// lock.
pub async fn sweep_map<K: std::hash::Hash + Eq, V>(
    map: &Mutex<IndexMap<K, V>>,
    mut keep: impl FnMut(&K, &V) -> bool,
    sweep: &mut Sweep,
) -> usize {
    let mut next = lock(map).len();
    let mut removed = 0;
    while next > 0 {
        let held = Instant::now();
        let mut dropped = Vec::new();
        {
            let mut entries = lock(map);
            let end = next.min(entries.len());
            let start = end.saturating_sub(SWEEP_SLICE);
            for i in (start..end).rev() {
                let Some((key, value)) = entries.get_index(i) else {
                    continue;
                };
                if !keep(key, value) {
                    dropped.extend(entries.swap_remove_index(i));
                }
            }
            sweep.examined += end - start;
            next = start;
        }
        let held = held.elapsed();
        sweep.slices += 1;
        sweep.slow_holds += usize::from(held >= Duration::from_millis(1));
        sweep.longest_hold = sweep.longest_hold.max(held);
        removed += dropped.len();
        drop(dropped);
        tokio::task::yield_now().await;
    }
    removed
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;

    /// Every entry present when a sweep starts is looked at exactly once,
    /// across many slices, and only the rejected ones go.
    #[tokio::test]
    async fn a_sliced_sweep_sees_every_entry_once_and_removes_the_rejected() {
        let n = SWEEP_SLICE * 5 + 17;
        let map = Mutex::new((0..n).map(|i| (i, i)).collect::<IndexMap<usize, usize>>());
        let mut seen = vec![0u32; n];
        let mut sweep = Sweep::default();
        let removed = sweep_map(
            &map,
            |key, _| {
                seen[*key] += 1;
                key % 3 != 0
            },
            &mut sweep,
        )
        .await;
        assert!(seen.iter().all(|&times| times == 1), "{seen:?}");
        assert_eq!(removed, n.div_ceil(3));
        assert_eq!((sweep.examined, sweep.slices), (n, 6));
        let left = lock(&map);
        assert_eq!(left.len(), n - n.div_ceil(3));
        assert!(left.keys().all(|k| k % 3 != 0));
    }

    /// Entries added while a sweep is under way (between its slices) are
    /// left for the next sweep, and none present at the start is skipped,
    /// even while others are removed.
    #[tokio::test(flavor = "current_thread")]
    async fn entries_added_during_a_sweep_wait_for_the_next() {
        let n = SWEEP_SLICE * 3;
        let map = Arc::new(Mutex::new(
            (0..n).map(|i| (i, ())).collect::<IndexMap<usize, ()>>(),
        ));
        let stop = CancellationToken::new();
        // Runs whenever the sweep yields between slices.
        let adder = tokio::spawn({
            let (map, stop) = (map.clone(), stop.clone());
            async move {
                let mut added = 0;
                while !stop.is_cancelled() {
                    lock(&map).insert(n + added, ());
                    added += 1;
                    tokio::task::yield_now().await;
                }
                added
            }
        });
        let mut seen = Vec::new();
        let mut sweep = Sweep::default();
        sweep_map(
            &map,
            |key, _| {
                seen.push(*key);
                key % 2 == 0
            },
            &mut sweep,
        )
        .await;
        stop.cancel();
        let added = adder.await.unwrap();
        assert!(added >= 3, "the adder ran between slices ({added})");
        seen.sort_unstable();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
        let left = lock(&map);
        assert_eq!(left.len(), n / 2 + added);
        assert!((n..n + added).all(|k| left.contains_key(&k)));
    }
}
