//! Which connections the guard holds, which it lets go, and what it says
//! about it: the one place the cap, the shared frame budget and the
//! rate-limited log live.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use super::GuardLimits;

/// The cap never shrinks below this on descriptor exhaustion, so the
/// operator keeps a way in.
const MIN_CAP: usize = 4;
/// How long the cap stays lowered after the last descriptor exhaustion.
const CAP_RECOVERY: Duration = Duration::from_secs(60);
/// At most one log line a second for each kind of trouble: a flood must not
/// become a flood of log (it was 500 MB in 20 s).
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// How the accept loop tells a connection's stream it was let go: the
/// stream checks it on every read and parks its waker here.
#[derive(Default)]
pub struct Eviction {
    evicted: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Eviction {
    pub fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    pub fn park(&self, waker: &Waker) {
        let mut slot = lock(&self.waker);
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
        if let Some(waker) = lock(&self.waker).take() {
            waker.wake();
        }
    }
}

struct Slot {
    eviction: Arc<Eviction>,
    /// It has sent a whole frame: a client, not a held-open descriptor.
    proven: bool,
}

struct Registry {
    next_id: u64,
    /// Open connections by age (ids only grow).
    open: BTreeMap<u64, Slot>,
    /// The cap in force: the configured one, or lower for a while after
    /// descriptors ran out.
    cap: usize,
    lowered_at: Option<Instant>,
}

/// A connection's slot.
pub struct Admitted {
    pub id: u64,
    pub eviction: Arc<Eviction>,
    /// Another connection was closed to make room for it.
    pub evicted_other: bool,
}

/// Kinds of trouble, each logged at most once a second.
#[derive(Clone, Copy, Debug)]
pub enum Trouble {
    Refused,
    Evicted,
    TimedOut,
    Oversize,
    OverBudget,
    AcceptFailed,
}

const TROUBLES: usize = 6;

#[derive(Default, Clone, Copy)]
struct Quiet {
    last: Option<Instant>,
    suppressed: u64,
}

/// The guard's state, shared by the accept loops and every stream.
pub struct Shared {
    pub limits: GuardLimits,
    registry: Mutex<Registry>,
    /// Announced payload bytes of large frames in flight, all connections.
    buffered: AtomicUsize,
    quiet: Mutex<[Quiet; TROUBLES]>,
}

/// A poisoned lock only means a panic elsewhere; the data is still counts.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn new(limits: GuardLimits) -> Shared {
        Shared {
            registry: Mutex::new(Registry {
                next_id: 0,
                open: BTreeMap::new(),
                cap: limits.max_connections.max(1),
                lowered_at: None,
            }),
            limits,
            buffered: AtomicUsize::new(0),
            quiet: Mutex::new([Quiet::default(); TROUBLES]),
        }
    }

    /// Takes a slot for a new connection. At the cap, the oldest connection
    /// that has never sent a whole frame goes instead: a held-open flood
    /// makes room for a client, and a client that has spoken is never shed
    /// for it. With none to shed, the new one is refused (None).
    pub fn admit(&self) -> Option<Admitted> {
        let mut reg = lock(&self.registry);
        let now = Instant::now();
        if reg
            .lowered_at
            .is_some_and(|at| now.duration_since(at) >= CAP_RECOVERY)
        {
            reg.cap = self.limits.max_connections.max(1);
            reg.lowered_at = None;
            tracing::info!("API connection cap back to {}", reg.cap);
        }
        let at_cap = reg.open.len() >= reg.cap;
        if at_cap && !evict_oldest_unproven(&mut reg) {
            let (open, cap) = (reg.open.len(), reg.cap);
            drop(reg);
            self.say(Trouble::Refused, |more| {
                tracing::warn!(
                    "API connection refused: {open} open, the cap is {cap}, every one has spoken{more}"
                )
            });
            return None;
        }
        let id = reg.next_id;
        reg.next_id += 1;
        let eviction = Arc::new(Eviction::default());
        reg.open.insert(
            id,
            Slot {
                eviction: eviction.clone(),
                proven: false,
            },
        );
        drop(reg);
        if at_cap {
            self.say(Trouble::Evicted, |more| {
                tracing::warn!(
                    "API connection cap reached: closed the oldest connection that never sent a request{more}"
                )
            });
        }
        Some(Admitted {
            id,
            eviction,
            evicted_other: at_cap,
        })
    }

    /// Descriptors ran out (EMFILE, ENFILE…): hold a quarter fewer
    /// connections for a while and close silent ones down to that, so the
    /// next accept can succeed. Returns the new cap and how many it closed.
    pub fn shed(&self) -> (usize, usize) {
        let mut reg = lock(&self.registry);
        reg.cap = (reg.open.len() * 3 / 4).max(MIN_CAP);
        reg.lowered_at = Some(Instant::now());
        let mut closed = 0;
        while reg.open.len() > reg.cap && evict_oldest_unproven(&mut reg) {
            closed += 1;
        }
        (reg.cap, closed)
    }

    pub fn proven(&self, id: u64) {
        if let Some(slot) = lock(&self.registry).open.get_mut(&id) {
            slot.proven = true;
        }
    }

    pub fn release(&self, id: u64) {
        lock(&self.registry).open.remove(&id);
    }

    /// Reserves `len` bytes of the shared budget for one large frame.
    pub fn reserve(&self, len: usize) -> bool {
        let budget = self.limits.max_buffered_bytes;
        self.buffered
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                now.checked_add(len).filter(|total| *total <= budget)
            })
            .is_ok()
    }

    pub fn unreserve(&self, len: usize) {
        self.buffered.fetch_sub(len, Ordering::AcqRel);
    }

    /// Runs `log` with ", and N more like it since the last" when this kind
    /// of trouble was not logged in the last second; counts it otherwise.
    pub fn say(&self, trouble: Trouble, log: impl FnOnce(&str)) {
        let now = Instant::now();
        let suppressed = {
            let mut quiet = lock(&self.quiet);
            let q = &mut quiet[trouble as usize];
            if q.last.is_some_and(|t| now.duration_since(t) < LOG_INTERVAL) {
                q.suppressed += 1;
                return;
            }
            q.last = Some(now);
            std::mem::take(&mut q.suppressed)
        };
        let more = if suppressed > 0 {
            format!(" ({suppressed} more like it not logged)")
        } else {
            String::new()
        };
        log(&more);
    }
}

fn evict_oldest_unproven(reg: &mut Registry) -> bool {
    let Some(id) = reg
        .open
        .iter()
        .find(|(_, slot)| !slot.proven)
        .map(|(id, _)| *id)
    else {
        return false;
    };
    if let Some(slot) = reg.open.remove(&id) {
        slot.eviction.evict();
    }
    true
}

/// Sleeps between failed accepts: 10 ms doubling to 1 s, back to 10 ms
/// after an accept succeeds. Never a busy loop on EMFILE.
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    pub fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(cap: usize) -> GuardLimits {
        GuardLimits {
            max_connections: cap,
            frame_timeout: Duration::from_secs(10),
            max_frame_bytes: 4 << 20,
            max_buffered_bytes: 8 << 20,
        }
    }

    #[test]
    fn at_the_cap_a_silent_connection_makes_room_and_a_client_does_not() {
        let shared = Shared::new(limits(2));
        let a = shared.admit().unwrap();
        let b = shared.admit().unwrap();
        shared.proven(a.id);
        let c = shared.admit().expect("b, silent, makes room");
        assert!(c.evicted_other);
        assert!(!a.eviction.is_evicted());
        assert!(b.eviction.is_evicted());
        assert!(!c.eviction.is_evicted());
        shared.release(b.id);
        shared.proven(c.id);
        assert!(shared.admit().is_none(), "both remaining have spoken");
        shared.release(a.id);
        assert!(shared.admit().is_some());
    }

    #[test]
    fn descriptor_exhaustion_lowers_the_cap_and_sheds_silent_ones() {
        let shared = Shared::new(limits(100));
        let admitted: Vec<_> = (0..12).map(|_| shared.admit().unwrap()).collect();
        shared.proven(admitted[0].id);
        assert_eq!(
            shared.shed(),
            (9, 3),
            "a quarter fewer, the oldest silent ones"
        );
        let evicted: Vec<bool> = admitted.iter().map(|a| a.eviction.is_evicted()).collect();
        assert_eq!(evicted[..5], [false, true, true, true, false]);
        // At the lowered cap each newcomer replaces the oldest silent one.
        assert!(shared.admit().unwrap().evicted_other);
        assert!(admitted[4].eviction.is_evicted());
    }

    #[test]
    fn the_budget_is_shared_and_given_back() {
        let shared = Shared::new(limits(10));
        assert!(shared.reserve(4 << 20));
        assert!(shared.reserve(4 << 20));
        assert!(!shared.reserve(1));
        shared.unreserve(4 << 20);
        assert!(shared.reserve(1));
    }

    #[test]
    fn backoff_doubles_to_a_second() {
        let mut b = Backoff::new();
        let delays: Vec<_> = (0..9).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 10);
    }

    #[test]
    fn trouble_is_said_once_a_second() {
        let shared = Shared::new(limits(1));
        let mut said = Vec::new();
        for _ in 0..1000 {
            shared.say(Trouble::Refused, |more| said.push(more.to_string()));
        }
        assert_eq!(said, [""]);
    }
}
