//! The speed limit: a token bucket in bytes per second.
//!
//! QEMU's `ratelimit.h` hands out a quota per 100 ms slice and lets the first
//! request of a slice through whatever its size, so a 512 KiB chunk passes
//! even when the quota is smaller and a stream job writes lumps of up to
//! 10 MiB every 100 ms. This bucket is smoother: it refills continuously
//! (exact integer arithmetic in byte-nanoseconds, so there is no drift), it
//! holds at most [`TokenBucket::burst`] bytes (20 ms worth, at least two
//! requests, at most 1 MiB),
//! and the job asks for [`TokenBucket::piece`]-sized requests (10 ms worth,
//! at most 256 KiB), so at any rate no window of time sees more than
//! `rate × window + burst` bytes.
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
pub const MAX_PIECE: u64 = 256 * 1024;
/// Largest burst at any rate.
pub const MAX_BURST: u64 = 1024 * 1024;

/// The request size the job uses at `rate` bytes/s: 10 ms worth, a
/// multiple of 4 KiB between 4 KiB and 256 KiB (`MAX_PIECE` when unlimited).
pub fn piece_for(rate: u64) -> u64 {
    if rate == 0 {
        return MAX_PIECE;
    }
    (rate / 100 / PIECE_ALIGN * PIECE_ALIGN).clamp(PIECE_ALIGN, MAX_PIECE)
}

/// The bucket capacity at `rate` bytes/s: 20 ms worth, at least two
/// pieces, at most 1 MiB (enough slack to absorb a late wake-up without
/// losing throughput, small enough to stay smooth).
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
}

impl TokenBucket {
    /// An empty bucket filling at `rate` bytes/s from time `now`.
    pub fn new(rate: u64, now: Duration) -> TokenBucket {
        TokenBucket {
            rate,
            burst: burst_for(rate),
            tokens: 0,
            last: now,
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

    fn refill(&mut self, now: Duration) {
        if now > self.last {
            let dt = (now - self.last).as_nanos();
            let cap = self.burst as i128 * NANOS as i128;
            let add = (self.rate as u128)
                .saturating_mul(dt)
                .min(i128::MAX as u128 / 2) as i128;
            self.tokens = self.tokens.saturating_add(add).min(cap);
            self.last = now;
        }
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
    /// as the bucket allows, oversleeping every wait by up to `jitter_us`
    /// and taking `copy_us` per granted piece. Returns (time, bytes) grants.
    fn simulate(rate: u64, secs: u64, jitter_us: u64, copy_us: u64) -> Vec<(Duration, u64)> {
        let mut rng = Lcg(42);
        let mut now = Duration::from_millis(5);
        let mut b = TokenBucket::new(rate, now);
        let mut grants = Vec::new();
        let end = Duration::from_secs(secs);
        while now < end {
            let n = b.piece();
            match b.take(n, now) {
                None => {
                    grants.push((now, n));
                    now += Duration::from_micros(copy_us);
                }
                Some(wait) => {
                    now += wait + Duration::from_micros(rng.next() % (jitter_us + 1));
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

    #[test]
    fn accurate_over_ten_seconds_and_smooth_at_20ms() {
        for rate in [10 * MIB, 50 * MIB, 200 * MIB, 1000 * 1000, 64 * 1024] {
            // Oversleeping by up to 2 ms on every wait (a loaded machine).
            let g = simulate(rate, 12, 2000, 20);
            let got = bytes_in(&g, Duration::from_secs(1), Duration::from_secs(11));
            let want = rate * 10;
            let err = (got as f64 - want as f64).abs() / want as f64;
            assert!(err < 0.01, "rate {rate}: got {got} in 10 s, want {want}");
            let excess = worst_excess(&g, rate, Duration::from_millis(20));
            assert!(
                excess <= burst_for(rate) as i64 && excess <= MIB as i64,
                "rate {rate}: 20 ms excess {excess}"
            );
        }
    }

    #[test]
    fn never_above_rate_plus_burst_in_any_window() {
        let rate = 30 * MIB;
        let g = simulate(rate, 3, 0, 0);
        for ms in [1u64, 5, 20, 100, 1000] {
            let excess = worst_excess(&g, rate, Duration::from_millis(ms));
            assert!(excess <= burst_for(rate) as i64, "{ms} ms: {excess}");
        }
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
        assert_eq!(burst_for(10 * MIB), 10 * MIB / 50);
        assert_eq!(burst_for(200 * MIB), MAX_BURST);
        assert_eq!(burst_for(1000), 2 * PIECE_ALIGN);
        assert_eq!(burst_for(0), 2 * MAX_PIECE);
    }
}
