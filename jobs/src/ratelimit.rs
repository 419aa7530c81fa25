//! The speed limit: a token bucket in bytes per second.
//!
//! QEMU's `ratelimit.h` hands out a quota per 100 ms slice and lets the first
//! request of a slice through whatever its size, so a 512 KiB chunk passes
//! even when the quota is smaller and a stream job writes lumps of up to
//! 10 MiB every 100 ms. This bucket is smoother: it refills continuously
//! (exact integer arithmetic in byte-nanoseconds, so there is no drift), it
//! holds at most [`TokenBucket::burst`] bytes (20 ms worth, at least two
//! requests, at most 512 KiB), and the job asks for
//! [`TokenBucket::piece`]-sized requests (10 ms worth, at most 128 KiB),
//! so no window of time sees more than `rate × window + burst` bytes.
//!
//! A plain bucket forgets the tokens that overflow it, so a job that is not
//! scheduled in time (a loaded machine) falls behind its rate for good. This
//! one remembers what overflowed *while a request was waiting* (starvation,
//! not idleness: a paused job earns nothing) as a credit of at most 100 ms
//! worth, and pays it back by refilling up to 5 % faster until it is gone:
//! the achieved rate stays on target over seconds while any 20 ms window
//! still sees at most `burst + 5 % × rate × 20 ms` beyond the rate.
//!
//! Time is passed in by the caller, so the logic is tested with a simulated
//! clock; the job sleeps on a condition variable for the returned delay and
//! asks again after every wake-up (a set-speed, pause or cancel wakes it),
//! so an early wake-up never lets a request through early.

use std::time::Duration;

const NANOS: u128 = 1_000_000_000;
/// Requests are multiples of this (a page).
pub const PIECE_ALIGN: u64 = 4096;
/// Largest request size handed out at any rate.
pub const MAX_PIECE: u64 = 128 * 1024;
/// Largest burst at any rate.
pub const MAX_BURST: u64 = 512 * 1024;
/// How much faster than the rate the bucket refills while paying back a
/// starvation credit, in percent.
pub const CATCH_UP_PERCENT: u128 = 5;
/// The largest starvation credit, in milliseconds of the rate.
pub const MAX_CREDIT_MS: u128 = 100;

/// The request size the job uses at `rate` bytes/s: 10 ms worth, a
/// multiple of 4 KiB between 4 KiB and `MAX_PIECE` (`MAX_PIECE` when
/// unlimited).
pub fn piece_for(rate: u64) -> u64 {
    if rate == 0 {
        return MAX_PIECE;
    }
    (rate / 100 / PIECE_ALIGN * PIECE_ALIGN).clamp(PIECE_ALIGN, MAX_PIECE)
}

/// The bucket capacity at `rate` bytes/s: 20 ms worth, at least two
/// pieces, at most `MAX_BURST` (slack for a late wake-up, small enough to
/// stay smooth).
pub fn burst_for(rate: u64) -> u64 {
    (rate / 50).clamp(2 * piece_for(rate), MAX_BURST)
}

/// A token bucket; `rate == 0` means unlimited.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    /// Available bytes × 1e9 (may go negative after a request larger than
    /// the burst).
    tokens: i128,
    /// The time `tokens` was last brought up to date.
    last: Duration,
    /// Requests currently waiting (see [`TokenBucket::add_waiter`]).
    waiters: u32,
    /// Starvation credit: bytes × 1e9 that overflowed while a request
    /// waited, still to be paid back.
    credit: i128,
}

impl TokenBucket {
    /// An empty bucket filling at `rate` bytes/s from time `now`.
    pub fn new(rate: u64, now: Duration) -> TokenBucket {
        TokenBucket {
            rate,
            burst: burst_for(rate),
            tokens: 0,
            last: now,
            waiters: 0,
            credit: 0,
        }
    }

    /// The rate in bytes/s (0 = unlimited).
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// The most bytes the bucket holds.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// The request size to use at the current rate.
    pub fn piece(&self) -> u64 {
        piece_for(self.rate)
    }

    /// The starvation credit still to be paid back, in bytes.
    pub fn credit(&self) -> u64 {
        (self.credit / NANOS as i128) as u64
    }

    fn refill(&mut self, now: Duration) {
        if now <= self.last {
            return;
        }
        let dt = (now - self.last).as_nanos();
        self.last = now;
        let cap = self.burst as i128 * NANOS as i128;
        let add = (self.rate as u128)
            .saturating_mul(dt)
            .min(i128::MAX as u128 / 4) as i128;
        let extra = self.credit.min(add / 100 * CATCH_UP_PERCENT as i128);
        self.credit -= extra;
        self.tokens = self.tokens.saturating_add(add + extra);
        if self.tokens > cap {
            let over = self.tokens - cap;
            self.tokens = cap;
            if self.waiters > 0 {
                let max = (self.rate as u128 * MAX_CREDIT_MS * 1_000_000) as i128;
                self.credit = (self.credit + over).min(max);
            }
        }
    }

    /// A request starts waiting at `now` (after `take` said to wait);
    /// tokens overflowing while requests wait become credit.
    pub fn add_waiter(&mut self, now: Duration) {
        self.refill(now);
        self.waiters += 1;
    }

    /// A waiting request stopped waiting (granted or given up) at `now`.
    pub fn remove_waiter(&mut self, now: Duration) {
        self.refill(now);
        self.waiters = self.waiters.saturating_sub(1);
    }

    /// Change the rate at time `now`: what accrued so far accrued at the old
    /// rate; the bucket keeps at most the new burst. Going from unlimited to
    /// a limit starts with an empty bucket.
    pub fn set_rate(&mut self, rate: u64, now: Duration) {
        if self.rate == 0 {
            self.tokens = 0;
            self.last = self.last.max(now);
        } else {
            self.refill(now);
        }
        self.rate = rate;
        self.burst = burst_for(rate);
        self.tokens = self.tokens.min(self.burst as i128 * NANOS as i128);
        self.credit = 0;
    }

    /// Ask for `n` bytes at time `now`: `None` when granted (the bytes are
    /// taken), otherwise how long to wait before asking again. A request
    /// larger than the burst is granted once the bucket is full and leaves
    /// it in debt.
    pub fn take(&mut self, n: u64, now: Duration) -> Option<Duration> {
        if self.rate == 0 || n == 0 {
            return None;
        }
        self.refill(now);
        let need = n.min(self.burst) as i128 * NANOS as i128;
        if self.tokens >= need {
            self.tokens -= n as i128 * NANOS as i128;
            return None;
        }
        let missing = (need - self.tokens) as u128;
        let ns = missing.div_ceil(self.rate as u128);
        Some(Duration::from_nanos(ns.min(u64::MAX as u128) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A tiny deterministic generator for simulated scheduling jitter.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    /// A greedy consumer against a simulated clock: asks for pieces as fast
    /// as the bucket allows (registering as a waiter while it waits),
    /// oversleeping every wait by up to `jitter_us`, and once every
    /// `stall_every` ms by `stall_us` more (not scheduled in time); each
    /// granted piece takes `copy_us`. Returns the (time, bytes) grants.
    fn simulate(
        rate: u64,
        secs: u64,
        jitter_us: u64,
        stall_every: u64,
        stall_us: u64,
        copy_us: u64,
    ) -> Vec<(Duration, u64)> {
        let mut rng = Lcg(42);
        let mut now = Duration::from_millis(5);
        let mut b = TokenBucket::new(rate, now);
        let mut grants = Vec::new();
        let end = Duration::from_secs(secs);
        let mut waiting = false;
        let mut next_stall = Duration::from_millis(stall_every);
        while now < end {
            let n = b.piece();
            match b.take(n, now) {
                None => {
                    if waiting {
                        b.remove_waiter(now);
                        waiting = false;
                    }
                    grants.push((now, n));
                    now += Duration::from_micros(copy_us);
                }
                Some(wait) => {
                    if !waiting {
                        b.add_waiter(now);
                        waiting = true;
                    }
                    let mut late = rng.next() % (jitter_us + 1);
                    if stall_every > 0 && now >= next_stall {
                        late += stall_us;
                        next_stall = now + Duration::from_millis(stall_every);
                    }
                    now += wait + Duration::from_micros(late);
                }
            }
        }
        grants
    }

    /// Bytes granted in `[from, to)`.
    fn bytes_in(grants: &[(Duration, u64)], from: Duration, to: Duration) -> u64 {
        grants
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|g| g.1)
            .sum()
    }

    /// The largest excess over the rate of any `window`-long span starting
    /// at a grant (grants are in time order: a sliding window).
    fn worst_excess(grants: &[(Duration, u64)], rate: u64, window: Duration) -> i64 {
        let allowed = (rate as u128 * window.as_nanos() / NANOS) as i64;
        let (mut j, mut sum, mut worst) = (0usize, 0u64, i64::MIN);
        for i in 0..grants.len() {
            while j < grants.len() && grants[j].0 < grants[i].0 + window {
                sum += grants[j].1;
                j += 1;
            }
            worst = worst.max(sum as i64 - allowed);
            sum -= grants[i].1;
        }
        worst
    }

    /// The most a 20 ms window may exceed the rate by.
    fn allowed_excess(rate: u64) -> i64 {
        (burst_for(rate) + rate / 50 * CATCH_UP_PERCENT as u64 / 100) as i64
    }

    #[test]
    fn accurate_over_ten_seconds_and_smooth_at_20ms() {
        for rate in [10 * MIB, 50 * MIB, 200 * MIB, 1000 * 1000, 64 * 1024] {
            // (jitter on every wait, a stall every n ms, stall length in µs):
            // stalls cost up to about 3 % of the time, which the credit
            // must make up.
            for (jitter, every, stall) in [(2000, 0, 0), (300, 100, 6000), (500, 1000, 30_000)] {
                let g = simulate(rate, 12, jitter, every, stall, 20);
                let got = bytes_in(&g, Duration::from_secs(1), Duration::from_secs(11));
                let want = rate * 10;
                let err = (got as f64 - want as f64).abs() / want as f64;
                assert!(
                    err < 0.01,
                    "rate {rate}, stalls {every}/{stall}: got {got} in 10 s, want {want}"
                );
                let excess = worst_excess(&g, rate, Duration::from_millis(20));
                assert!(
                    excess <= allowed_excess(rate) && excess <= MIB as i64,
                    "rate {rate}, stalls {every}/{stall}: 20 ms excess {excess}"
                );
            }
        }
    }

    #[test]
    fn never_above_rate_plus_burst_in_any_window() {
        let rate = 30 * MIB;
        let g = simulate(rate, 3, 0, 0, 0, 0);
        for ms in [1u64, 5, 20, 100, 1000] {
            let excess = worst_excess(&g, rate, Duration::from_millis(ms));
            assert!(excess <= burst_for(rate) as i64, "{ms} ms: {excess}");
        }
    }

    #[test]
    fn a_plain_bucket_would_fall_behind_when_starved() {
        // The same starved consumer without registering as a waiter (no
        // credit) loses throughput: what the credit is for.
        let rate = 200 * MIB;
        let mut rng = Lcg(1);
        let mut now = Duration::ZERO;
        let mut b = TokenBucket::new(rate, now);
        let mut got = 0;
        while now < Duration::from_secs(10) {
            match b.take(b.piece(), now) {
                None => got += b.piece(),
                Some(w) => {
                    let stall = if rng.next().is_multiple_of(5) {
                        6000
                    } else {
                        0
                    };
                    now += w + Duration::from_micros(300 + stall);
                }
            }
        }
        assert!(got < rate * 10 * 97 / 100, "{got}");
    }

    #[test]
    fn idle_time_earns_no_credit() {
        let rate = 10 * MIB;
        let mut b = TokenBucket::new(rate, Duration::ZERO);
        // Nobody waits for a second (a paused job): nothing is owed.
        assert!(b.take(b.piece(), Duration::from_secs(1)).is_none());
        assert_eq!(b.credit(), 0);
        // A waiter that is not scheduled for 50 ms is owed what overflowed,
        // at most 100 ms worth.
        let t = Duration::from_secs(2);
        assert!(b.take(b.burst(), t).is_none(), "full after idling");
        let w = b.take(b.burst(), t).unwrap();
        b.add_waiter(t);
        assert!(b
            .take(b.burst(), t + w + Duration::from_millis(50))
            .is_none());
        let c = b.credit();
        assert!(c > rate / 40 && c <= rate / 10, "{c}");
        b.remove_waiter(t + Duration::from_secs(1));
        // A rate change forgets it.
        b.set_rate(rate, t + Duration::from_secs(1));
        assert_eq!(b.credit(), 0);
    }

    #[test]
    fn early_wakeups_do_not_let_requests_through() {
        let rate = 10 * MIB;
        let mut now = Duration::ZERO;
        let mut b = TokenBucket::new(rate, now);
        let n = b.piece();
        let mut granted = 0u64;
        let mut rng = Lcg(7);
        // Wake up at a random fraction of every announced delay.
        while now < Duration::from_secs(2) {
            match b.take(n, now) {
                None => granted += n,
                Some(w) => {
                    now += w.mul_f64((rng.next() % 100) as f64 / 100.0) + Duration::from_nanos(1)
                }
            }
        }
        assert!(granted <= rate * 2 + b.burst(), "{granted}");
    }

    #[test]
    fn rate_changes_take_effect_at_once() {
        let mut now = Duration::ZERO;
        let mut b = TokenBucket::new(MIB, now);
        let mut total = 0;
        let run = |b: &mut TokenBucket, now: &mut Duration, until: Duration| {
            let mut got = 0;
            while *now < until {
                let n = b.piece();
                match b.take(n, *now) {
                    None => got += n,
                    Some(w) => *now += w,
                }
            }
            got
        };
        total += run(&mut b, &mut now, Duration::from_secs(1));
        assert!(total.abs_diff(MIB) <= b.burst(), "{total}");
        b.set_rate(8 * MIB, now);
        let fast = run(&mut b, &mut now, Duration::from_secs(2));
        assert!(fast.abs_diff(8 * MIB) <= b.burst(), "{fast}");
        // Unlimited: everything passes, no waiting.
        b.set_rate(0, now);
        assert_eq!(b.take(u64::MAX / 2, now), None);
        // Back to a limit: starts empty, no burst carried over.
        b.set_rate(MIB, now);
        assert!(b.take(b.piece(), now).is_some());
    }

    #[test]
    fn requests_larger_than_the_burst_wait_then_go_into_debt() {
        let mut b = TokenBucket::new(100 * 1024, Duration::ZERO);
        let burst = b.burst();
        let big = burst * 4;
        let w = b.take(big, Duration::ZERO).expect("must wait");
        let t = w;
        assert_eq!(b.take(big, t), None);
        // Now in debt: the next piece waits for the debt plus itself.
        let w2 = b.take(4096, t).unwrap();
        assert!(
            w2 >= Duration::from_secs_f64((big - burst + 4096) as f64 / (100.0 * 1024.0))
                - Duration::from_millis(1)
        );
    }

    #[test]
    fn piece_and_burst_sizes() {
        assert_eq!(piece_for(0), MAX_PIECE);
        assert_eq!(piece_for(1), PIECE_ALIGN);
        assert_eq!(piece_for(10 * MIB), 100 * 1024);
        assert_eq!(piece_for(200 * MIB), MAX_PIECE);
        assert_eq!(piece_for(50 * MIB), MAX_PIECE);
        assert_eq!(burst_for(10 * MIB), 10 * MIB / 50);
        assert_eq!(burst_for(200 * MIB), MAX_BURST);
        assert!(MAX_BURST + 200 * MIB / 50 * CATCH_UP_PERCENT as u64 / 100 < 1 << 20);
        assert_eq!(burst_for(1000), 2 * PIECE_ALIGN);
        assert_eq!(burst_for(0), 2 * MAX_PIECE);
    }
}
