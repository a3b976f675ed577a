//! The scaling watch (docs/scaling.md): each second the agent compares a VM's CPU use — its vCPU
//! threads' time against its vCPU count — with the thresholds of the VM's scaling policy. When
//! the use stays at or above the up threshold for the whole up window, or at or below the down
//! threshold for the whole down window, it asks vimd to resize the VM once, and watches a fresh
//! window from then on. vimd decides what happens (and cools down after a change).

use std::time::{Duration, Instant};

use vim_proto::ScalingWatch;

/// Which way the VM should go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    Up,
    Down,
}

/// What the watch saw over a window.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub ask: Ask,
    /// Average use over the window, in percent of the VM's vCPUs.
    pub avg_pct: f64,
    pub window: Duration,
}

/// A run of samples on one side of a threshold: since when, and their sum.
#[derive(Debug, Default, Clone, Copy)]
struct Run {
    since: Option<Instant>,
    sum: f64,
    n: u32,
}

impl Run {
    fn add(&mut self, now: Instant, pct: f64) {
        self.since.get_or_insert(now);
        self.sum += pct;
        self.n += 1;
    }

    fn lasted(&self, now: Instant) -> Duration {
        self.since.map_or(Duration::ZERO, |s| now - s)
    }

    fn avg(&self) -> f64 {
        self.sum / f64::from(self.n.max(1))
    }
}

#[derive(Debug, Default)]
pub struct Watch {
    above: Run,
    below: Run,
}

impl Watch {
    /// One sample of the VM's use (`pct` of its `vcpus`); a request when a window is complete.
    /// The first sample of a run marks its start, so a window of W seconds needs W seconds of
    /// samples after it.
    pub fn sample(
        &mut self,
        cfg: Option<&ScalingWatch>,
        now: Instant,
        pct: f64,
        vcpus: u32,
    ) -> Option<Request> {
        let Some(c) = cfg else {
            *self = Watch::default();
            return None;
        };
        if pct >= f64::from(c.up_pct) {
            self.above.add(now, pct);
        } else {
            self.above = Run::default();
        }
        // A VM at its floor is not asked to shrink.
        if pct <= f64::from(c.down_pct) && vcpus > c.min_vcpus.max(1) {
            self.below.add(now, pct);
        } else {
            self.below = Run::default();
        }
        let up = Duration::from_secs(u64::from(c.up_window_s));
        let down = Duration::from_secs(u64::from(c.down_window_s));
        let r = if self.above.since.is_some() && self.above.lasted(now) >= up {
            Some(Request {
                ask: Ask::Up,
                avg_pct: self.above.avg(),
                window: up,
            })
        } else if self.below.since.is_some() && self.below.lasted(now) >= down {
            Some(Request {
                ask: Ask::Down,
                avg_pct: self.below.avg(),
                window: down,
            })
        } else {
            None
        };
        if r.is_some() {
            *self = Watch::default();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ScalingWatch {
        ScalingWatch {
            up_pct: 80,
            up_window_s: 3,
            down_pct: 15,
            down_window_s: 5,
            min_vcpus: 1,
        }
    }

    /// Samples once a second from `t0`; the first request and the second it came.
    fn feed(
        w: &mut Watch,
        cfg: Option<&ScalingWatch>,
        pcts: &[f64],
        vcpus: u32,
    ) -> Option<(usize, Request)> {
        let t0 = Instant::now();
        pcts.iter().enumerate().find_map(|(i, p)| {
            w.sample(cfg, t0 + Duration::from_secs(i as u64), *p, vcpus)
                .map(|r| (i, r))
        })
    }

    #[test]
    fn busy_for_the_whole_window_asks_up_once() {
        let mut w = Watch::default();
        let (at, r) = feed(&mut w, Some(&cfg()), &[90.0, 95.0, 85.0, 100.0, 100.0], 1).unwrap();
        assert_eq!(at, 3, "3 s after the first busy sample");
        assert_eq!(r.ask, Ask::Up);
        assert_eq!(r.avg_pct, 92.5);
        // The window starts again after a request.
        assert!(feed(&mut w, Some(&cfg()), &[100.0, 100.0], 1).is_none());
    }

    #[test]
    fn one_quiet_sample_breaks_the_run() {
        let mut w = Watch::default();
        let r = feed(
            &mut w,
            Some(&cfg()),
            &[90.0, 90.0, 50.0, 90.0, 90.0, 90.0],
            1,
        );
        assert!(r.is_none(), "{r:?}");
    }

    #[test]
    fn idle_asks_down_but_not_at_the_floor_and_not_without_a_policy() {
        let mut w = Watch::default();
        let idle = [1.0; 8];
        let (at, r) = feed(&mut w, Some(&cfg()), &idle, 4).unwrap();
        assert_eq!((at, r.ask), (5, Ask::Down));
        let mut w = Watch::default();
        assert!(feed(&mut w, Some(&cfg()), &idle, 1).is_none());
        let mut w = Watch::default();
        assert!(feed(&mut w, None, &[100.0; 8], 1).is_none());
    }
}
