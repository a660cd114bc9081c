//! The stage's memory budget: the text between the driver and the writer (decoded, queued for
//! the pool, or encoded and waiting for its turn) is bounded, so memory does not grow with the
//! budget or with how far the tokenizer threads run ahead of the writer.

use std::sync::{Condvar, Mutex};

/// Bookkeeping charged per document on top of its text (id, row, the encoded ids' `Vec`).
pub(super) const DOC_OVERHEAD: u64 = 256;

/// Text bytes allowed between the driver and the writer: 2 MiB per tokenizer thread, at least
/// 8 MiB, so one long document at the head of the order does not starve the other threads.
pub(super) fn in_flight_cap(threads: usize) -> u64 {
    (threads as u64 * (2 << 20)).max(8 << 20)
}

/// A byte budget shared by the driver (takes) and the writer (gives back). One item larger
/// than the whole budget still passes when nothing else is in flight. A driver that had to wait
/// goes on only once the budget is half free, so it wakes once per burst of items rather than
/// once per item the writer finishes.
pub(super) struct InFlight {
    pub(super) cap: u64,
    pub(super) state: Mutex<(u64, bool)>,
    pub(super) freed: Condvar,
}

impl InFlight {
    pub(super) fn new(cap: u64) -> Self {
        InFlight {
            cap,
            state: Mutex::new((0, false)),
            freed: Condvar::new(),
        }
    }

    pub(super) fn acquire(&self, n: u64) {
        let mut s = self.state.lock().expect("in-flight lock");
        let mut waited = false;
        while !s.1 && !self.may_take(s.0, n, waited) {
            waited = true;
            s = self.freed.wait(s).expect("in-flight lock");
        }
        s.0 += n;
    }

    /// Whether `n` more may go in with `now` in flight; `waited`: the caller already had to wait.
    pub(super) fn may_take(&self, now: u64, n: u64, waited: bool) -> bool {
        now == 0 || (now + n <= self.cap && (!waited || now <= self.cap / 2))
    }

    pub(super) fn release(&self, n: u64) {
        let mut s = self.state.lock().expect("in-flight lock");
        s.0 -= n;
        if s.0 <= self.cap / 2 {
            self.freed.notify_all();
        }
    }

    /// The writer is gone: nothing waits any more.
    pub(super) fn close(&self) {
        let mut s = self.state.lock().expect("in-flight lock");
        s.1 = true;
        self.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    pub(super) fn in_flight_blocks_at_the_cap_and_lets_one_oversized_item_through() {
        let f = InFlight::new(10);
        f.acquire(25); // alone: passes
        let waited = std::thread::scope(|s| {
            let t = s.spawn(|| {
                let t0 = Instant::now();
                f.acquire(5);
                t0.elapsed()
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            f.release(25);
            t.join().unwrap()
        });
        assert!(waited >= std::time::Duration::from_millis(40), "{waited:?}");
        f.acquire(5); // 10 in flight: at the cap, still fits
        f.close();
        f.acquire(100); // closed: never waits
    }

    #[test]
    pub(super) fn a_waiting_driver_goes_on_only_once_half_the_budget_is_free() {
        let f = InFlight::new(10);
        // Not waited yet: whatever fits goes.
        assert!(f.may_take(6, 4, false));
        assert!(!f.may_take(7, 4, false));
        // Waited: it fits, but more than half is still in flight.
        assert!(!f.may_take(6, 4, true));
        assert!(f.may_take(5, 4, true));
        assert!(!f.may_take(5, 6, true));
        // Nothing in flight: anything goes.
        assert!(f.may_take(0, 25, true));
    }
}
