//! The stage's KV caches: who owns each sequence, which are in a micro-batch right now, and
//! when an idle one is freed. Every ownership and capacity rule of the stage lives here.
//!
//! A sequence is named by its gateway: the key is (owner, sequence id), so any number of
//! gateways share a stage and none can continue, release or overwrite another's sequence. A
//! sequence's cache is taken out of the store while its micro-batch runs (so a batch never
//! holds the store's lock while it computes); a release that arrives then is remembered and
//! honoured when the batch puts the cache back.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use moe_proto::v1::SeqSlice;
use tonic::Status;

use crate::model::KvCache;

/// Longest owner name a stage accepts (bytes).
pub const MAX_OWNER_LEN: usize = 256;

enum Slot {
    /// Waiting for the sequence's next micro-batch.
    Idle { cache: KvCache, used: Instant },
    /// In a micro-batch now; `release`: free it when the batch finishes.
    Busy { release: bool },
}

#[derive(Default)]
struct Inner {
    owners: HashMap<String, HashMap<u64, Slot>>,
    /// Sequences held (idle and busy), over all owners.
    count: usize,
}

pub struct KvStore {
    inner: Mutex<Inner>,
    max_sequences: usize,
}

/// Checks an owner name from the wire.
pub fn check_owner(owner: &str) -> Result<(), Status> {
    if owner.is_empty() {
        return Err(Status::invalid_argument(
            "owner: required (the gateway instance that owns the sequences)",
        ));
    }
    if owner.len() > MAX_OWNER_LEN {
        return Err(Status::invalid_argument(format!(
            "owner: {} bytes, at most {MAX_OWNER_LEN}",
            owner.len()
        )));
    }
    Ok(())
}

impl KvStore {
    pub fn new(max_sequences: usize) -> Self {
        Self {
            inner: Mutex::default(),
            max_sequences,
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, Status> {
        self.inner
            .lock()
            .map_err(|_| Status::internal("KV cache store lock poisoned"))
    }

    /// Most sequences it holds caches for.
    pub fn capacity(&self) -> usize {
        self.max_sequences
    }

    /// Sequences holding a cache (including those in a micro-batch now).
    pub fn len(&self) -> usize {
        self.inner.lock().map(|g| g.count).unwrap_or(0)
    }

    /// Takes the caches of a micro-batch's sequences out of the store, all or none: a new
    /// sequence (`start == 0`) gets a fresh cache of `new_cache(positions)`, a continuation
    /// must find its own idle cache holding exactly `start` positions. The taken sequences are
    /// marked busy until [`KvStore::finish`].
    ///
    /// Refusals: RESOURCE_EXHAUSTED when the stage holds `max_sequences` (retryable: the
    /// gateway answers 503), FAILED_PRECONDITION when a continuation finds no cache of its
    /// owner (released, evicted, or the stage restarted) or one of another length, ABORTED
    /// when the sequence is already in a micro-batch.
    pub fn take(
        &self,
        owner: &str,
        seqs: &[SeqSlice],
        stage: u32,
        new_cache: impl Fn(&SeqSlice) -> KvCache,
    ) -> Result<Vec<KvCache>, Status> {
        let mut g = self.lock()?;
        let Inner { owners, count } = &mut *g;
        let mine = owners.get(owner);
        let mut new = 0;
        for s in seqs {
            match (s.start, mine.and_then(|m| m.get(&s.seq_id))) {
                (_, Some(Slot::Busy { .. })) => {
                    return Err(Status::aborted(format!(
                        "sequence {} is already in a micro-batch on stage {stage}",
                        s.seq_id
                    )));
                }
                // A restarted sequence replaces its old cache: no new slot.
                (0, Some(Slot::Idle { .. })) => {}
                (0, None) => new += 1,
                (start, Some(Slot::Idle { cache, .. })) if cache.len() != start as usize => {
                    return Err(Status::failed_precondition(format!(
                        "sequence {} starts at {start} but stage {stage} has {} positions cached",
                        s.seq_id,
                        cache.len()
                    )));
                }
                (_, Some(Slot::Idle { .. })) => {}
                (_, None) => {
                    return Err(Status::failed_precondition(format!(
                        "sequence {} has no KV cache on stage {stage} (released, evicted \
                         after sitting idle, or the stage restarted)",
                        s.seq_id
                    )));
                }
            }
        }
        if *count + new > self.max_sequences {
            return Err(Status::resource_exhausted(format!(
                "stage {stage} holds {count} sequences' KV caches; its limit is {}",
                self.max_sequences
            )));
        }
        let mine = owners.entry(owner.to_string()).or_default();
        let mut out = Vec::with_capacity(seqs.len());
        for s in seqs {
            let old = mine.insert(s.seq_id, Slot::Busy { release: false });
            let cache = match old {
                Some(Slot::Idle { cache, .. }) if s.start != 0 => cache,
                Some(_) => new_cache(s),
                None => {
                    *count += 1;
                    new_cache(s)
                }
            };
            out.push(cache);
        }
        Ok(out)
    }

    /// Ends a micro-batch: with its caches (`Some`, the batch succeeded) each sequence goes
    /// back to idle, unless it was released meanwhile; without (`None`, the batch failed and
    /// the caches no longer agree across stages) every sequence is dropped.
    pub fn finish(&self, owner: &str, seqs: &[SeqSlice], caches: Option<Vec<KvCache>>) {
        let Ok(mut g) = self.inner.lock() else {
            return;
        };
        let Inner { owners, count } = &mut *g;
        let Some(mine) = owners.get_mut(owner) else {
            return;
        };
        let now = Instant::now();
        let mut caches = caches.map(Vec::into_iter);
        for s in seqs {
            let cache = caches.as_mut().and_then(Iterator::next);
            let keep = matches!(mine.get(&s.seq_id), Some(Slot::Busy { release: false }));
            match cache {
                Some(cache) if keep => {
                    mine.insert(s.seq_id, Slot::Idle { cache, used: now });
                }
                _ => {
                    if mine.remove(&s.seq_id).is_some() {
                        *count -= 1;
                    }
                }
            }
        }
        if mine.is_empty() {
            owners.remove(owner);
        }
    }

    /// Frees `owner`'s sequences among `ids`; one in a micro-batch now is freed when the batch
    /// finishes. Other owners' sequences are never touched. Returns how many it held.
    pub fn release(&self, owner: &str, ids: &[u64]) -> u32 {
        let Ok(mut g) = self.inner.lock() else {
            return 0;
        };
        let Inner { owners, count } = &mut *g;
        let Some(mine) = owners.get_mut(owner) else {
            return 0;
        };
        let mut released = 0;
        for id in ids {
            match mine.get_mut(id) {
                Some(Slot::Busy { release }) => {
                    released += u32::from(!*release);
                    *release = true;
                }
                Some(Slot::Idle { .. }) => {
                    mine.remove(id);
                    *count -= 1;
                    released += 1;
                }
                None => {}
            }
        }
        if mine.is_empty() {
            owners.remove(owner);
        }
        released
    }

    /// Frees caches no micro-batch has used for `idle` (a gateway that died never releases its
    /// sequences). Busy sequences are never evicted. Returns how many were freed.
    pub fn evict_idle(&self, idle: Duration) -> usize {
        let Ok(mut g) = self.inner.lock() else {
            return 0;
        };
        let Inner { owners, count } = &mut *g;
        let mut freed = 0;
        for mine in owners.values_mut() {
            mine.retain(|_, s| match s {
                Slot::Idle { used, .. } if used.elapsed() >= idle => {
                    freed += 1;
                    false
                }
                _ => true,
            });
        }
        owners.retain(|_, m| !m.is_empty());
        *count -= freed;
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Makes caches of one layer, 4 values per position.
    struct Model;
    impl Model {
        fn new_cache(&self, capacity: usize) -> KvCache {
            KvCache::new(1, 4, 4, capacity)
        }
    }

    fn model() -> Model {
        Model
    }

    fn slice(seq_id: u64, start: u32, len: u32) -> SeqSlice {
        SeqSlice {
            seq_id,
            start,
            len,
            capacity: 16,
        }
    }

    /// Runs one "micro-batch": take, grow each cache by `len` positions, finish.
    fn step(kv: &KvStore, m: &Model, owner: &str, seqs: &[SeqSlice]) -> Result<(), Status> {
        let mut caches = kv.take(owner, seqs, 0, |s| m.new_cache(s.capacity as usize))?;
        for (c, s) in caches.iter_mut().zip(seqs) {
            c.advance_for_test(s.len as usize);
        }
        kv.finish(owner, seqs, Some(caches));
        Ok(())
    }

    #[test]
    fn owners_never_touch_each_others_sequences() {
        let m = model();
        let kv = KvStore::new(8);
        step(&kv, &m, "a", &[slice(1, 0, 3)]).expect("a starts");
        step(&kv, &m, "b", &[slice(1, 0, 5)]).expect("b starts its own 1");
        assert_eq!(kv.len(), 2);
        // b cannot continue or release a's sequence (it addresses its own, or nothing).
        let e = step(&kv, &m, "b", &[slice(1, 3, 1)]).expect_err("length of b's own 1 is 5");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert_eq!(kv.release("c", &[1]), 0);
        step(&kv, &m, "a", &[slice(1, 3, 1)]).expect("a continues");
        assert_eq!(kv.release("a", &[1]), 1);
        assert_eq!(kv.len(), 1);
        let e = step(&kv, &m, "a", &[slice(1, 4, 1)]).expect_err("released");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        step(&kv, &m, "b", &[slice(1, 5, 1)]).expect("b's sequence is intact");
    }

    #[test]
    fn a_release_during_the_batch_is_honoured_when_it_finishes() {
        let m = model();
        let kv = KvStore::new(8);
        let seqs = [slice(7, 0, 2), slice(8, 0, 2)];
        let caches = kv
            .take("g", &seqs, 0, |s| m.new_cache(s.capacity as usize))
            .expect("take");
        assert_eq!(kv.release("g", &[7]), 1);
        assert_eq!(kv.release("g", &[7]), 0, "counted once");
        let Err(e) = kv.take("g", &[slice(8, 0, 1)], 0, |s| {
            m.new_cache(s.capacity as usize)
        }) else {
            panic!("a busy sequence was taken twice");
        };
        assert_eq!(e.code(), tonic::Code::Aborted);
        kv.finish("g", &seqs, Some(caches));
        assert_eq!(kv.len(), 1, "7 freed at the end of its batch; 8 kept");
        assert_eq!(kv.release("g", &[7, 8]), 1);
        assert_eq!(kv.len(), 0);
    }

    #[test]
    fn capacity_counts_every_owner_and_refuses_retryably() {
        let m = model();
        let kv = KvStore::new(2);
        step(&kv, &m, "a", &[slice(1, 0, 1)]).expect("1");
        step(&kv, &m, "b", &[slice(1, 0, 1)]).expect("2");
        let e = step(&kv, &m, "c", &[slice(1, 0, 1)]).expect_err("full");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        // Restarting an existing sequence needs no new slot.
        step(&kv, &m, "a", &[slice(1, 0, 2)]).expect("restart");
        // A failed batch drops its sequences.
        let caches = kv
            .take("b", &[slice(1, 1, 1)], 0, |s| {
                m.new_cache(s.capacity as usize)
            })
            .expect("take");
        drop(caches);
        kv.finish("b", &[slice(1, 1, 1)], None);
        assert_eq!(kv.len(), 1);
        step(&kv, &m, "c", &[slice(1, 0, 1)]).expect("room again");
    }

    #[test]
    fn idle_eviction_spares_busy_sequences() {
        let m = model();
        let kv = KvStore::new(4);
        step(&kv, &m, "a", &[slice(1, 0, 1)]).expect("a");
        let busy = [slice(2, 0, 1)];
        let caches = kv
            .take("a", &busy, 0, |s| m.new_cache(s.capacity as usize))
            .expect("take");
        assert_eq!(kv.evict_idle(Duration::ZERO), 1);
        assert_eq!(kv.len(), 1);
        kv.finish("a", &busy, Some(caches));
        assert_eq!(kv.len(), 1);
        assert_eq!(kv.evict_idle(Duration::ZERO), 1);
        assert_eq!(kv.len(), 0);
    }

    #[test]
    fn owner_names_are_checked() {
        assert!(check_owner("").is_err());
        assert!(check_owner(&"x".repeat(MAX_OWNER_LEN + 1)).is_err());
        assert!(check_owner("gateway-0/3f2a").is_ok());
    }
}
