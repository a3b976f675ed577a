//! The scaling watch (docs/scaling.md): each second the agent compares a VM's use with the
//! thresholds of the VM's scaling policy. The use is the higher of its CPU use — its vCPU
//! threads' time against its vCPU count — and its memory use — total minus available in the
//! guest's own statistics (its balloon's), when it reports them: short of either, the VM should
//! grow; it may shrink only when both are low. When the use stays at or above the up threshold
//! for the whole up window, or at or below the down threshold for the whole down window, it asks
//! vimd to resize the VM once, and watches a fresh window from then on. vimd decides what happens
//! (and cools down after a change).

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
    /// Average CPU use over the window, in percent of the VM's vCPUs.
    pub cpu_pct: f64,
    /// Average memory use over the window, in percent of its memory (none: never reported).
    pub memory_pct: Option<f64>,
    pub window: Duration,
}

/// One second's use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// CPU, in percent of the VM's vCPUs.
    pub cpu_pct: f64,
    /// Memory, in percent of the guest's (none: no recent statistics).
    pub memory_pct: Option<f64>,
}

impl Sample {
    /// What is compared with the thresholds: the scarcer resource.
    fn pct(&self) -> f64 {
        self.cpu_pct.max(self.memory_pct.unwrap_or(0.0))
    }
}

/// A run of samples on one side of a threshold: since when, and their sums.
#[derive(Debug, Default, Clone, Copy)]
struct Run {
    since: Option<Instant>,
    cpu: f64,
    n: u32,
    memory: f64,
    n_memory: u32,
}

impl Run {
    fn add(&mut self, now: Instant, s: Sample) {
        self.since.get_or_insert(now);
        self.cpu += s.cpu_pct;
        self.n += 1;
        if let Some(m) = s.memory_pct {
            self.memory += m;
            self.n_memory += 1;
        }
    }

    fn lasted(&self, now: Instant) -> Duration {
        self.since.map_or(Duration::ZERO, |s| now - s)
    }

    fn request(&self, ask: Ask, window: Duration) -> Request {
        Request {
            ask,
            cpu_pct: self.cpu / f64::from(self.n.max(1)),
            memory_pct: (self.n_memory > 0).then(|| self.memory / f64::from(self.n_memory)),
            window,
        }
    }
}

#[derive(Debug, Default)]
pub struct Watch {
    above: Run,
    below: Run,
}

impl Watch {
    /// One second's use of the VM (which has `vcpus`); a request when a window is complete.
    /// The first sample of a run marks its start, so a window of W seconds needs W seconds of
    /// samples after it.
    pub fn sample(
        &mut self,
        cfg: Option<&ScalingWatch>,
        now: Instant,
        use_: Sample,
        vcpus: u32,
    ) -> Option<Request> {
        let Some(c) = cfg else {
            *self = Watch::default();
            return None;
        };
        let pct = use_.pct();
        if pct >= f64::from(c.up_pct) {
            self.above.add(now, use_);
        } else {
            self.above = Run::default();
        }
        // A VM at its floor is not asked to shrink.
        if pct <= f64::from(c.down_pct) && vcpus > c.min_vcpus.max(1) {
            self.below.add(now, use_);
        } else {
            self.below = Run::default();
        }
        let up = Duration::from_secs(u64::from(c.up_window_s));
        let down = Duration::from_secs(u64::from(c.down_window_s));
        let r = if self.above.since.is_some() && self.above.lasted(now) >= up {
            Some(self.above.request(Ask::Up, up))
        } else if self.below.since.is_some() && self.below.lasted(now) >= down {
            Some(self.below.request(Ask::Down, down))
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

    /// CPU samples (no memory statistics) once a second from `t0`; the first request and the
    /// second it came.
    fn feed(
        w: &mut Watch,
        cfg: Option<&ScalingWatch>,
        pcts: &[f64],
        vcpus: u32,
    ) -> Option<(usize, Request)> {
        let samples: Vec<Sample> = pcts
            .iter()
            .map(|p| Sample {
                cpu_pct: *p,
                memory_pct: None,
            })
            .collect();
        feed_samples(w, cfg, &samples, vcpus)
    }

    fn feed_samples(
        w: &mut Watch,
        cfg: Option<&ScalingWatch>,
        samples: &[Sample],
        vcpus: u32,
    ) -> Option<(usize, Request)> {
        let t0 = Instant::now();
        samples.iter().enumerate().find_map(|(i, s)| {
            w.sample(cfg, t0 + Duration::from_secs(i as u64), *s, vcpus)
                .map(|r| (i, r))
        })
    }

    #[test]
    fn a_guest_short_of_memory_asks_up_and_one_using_it_does_not_shrink() {
        let s = |cpu_pct, m: f64| Sample {
            cpu_pct,
            memory_pct: Some(m),
        };
        // Idle CPU, memory 90 % used: up, with both averages.
        let mut w = Watch::default();
        let full = [s(2.0, 90.0), s(2.0, 92.0), s(2.0, 94.0), s(2.0, 96.0)];
        let (at, r) = feed_samples(&mut w, Some(&cfg()), &full, 2).unwrap();
        assert_eq!((at, r.ask), (3, Ask::Up));
        assert_eq!((r.cpu_pct, r.memory_pct), (2.0, Some(93.0)));
        // Idle CPU but half its memory in use: no shrinking.
        let mut w = Watch::default();
        assert!(feed_samples(&mut w, Some(&cfg()), &[s(1.0, 50.0); 8], 4).is_none());
        // Both low: down. A sample without statistics counts on CPU alone.
        let mut w = Watch::default();
        let mut low = vec![s(1.0, 10.0); 7];
        low[3].memory_pct = None;
        let (_, r) = feed_samples(&mut w, Some(&cfg()), &low, 4).unwrap();
        assert_eq!(r.ask, Ask::Down);
        assert_eq!(r.memory_pct, Some(10.0));
    }

    #[test]
    fn busy_for_the_whole_window_asks_up_once() {
        let mut w = Watch::default();
        let (at, r) = feed(&mut w, Some(&cfg()), &[90.0, 95.0, 85.0, 100.0, 100.0], 1).unwrap();
        assert_eq!(at, 3, "3 s after the first busy sample");
        assert_eq!(r.ask, Ask::Up);
        assert_eq!((r.cpu_pct, r.memory_pct), (92.5, None));
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
