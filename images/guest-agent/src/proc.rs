//! What the agent reads from /proc and /sys: CPU time per CPU, memory, CPU online state.

use std::collections::BTreeMap;

/// Jiffies per CPU from /proc/stat: (busy, total).
pub fn cpu_times(stat: &str) -> BTreeMap<u32, (u64, u64)> {
    let mut out = BTreeMap::new();
    for line in stat.lines() {
        let mut f = line.split_whitespace();
        let Some(name) = f.next() else { continue };
        let Some(n) = name.strip_prefix("cpu").and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let v: Vec<u64> = f.filter_map(|x| x.parse().ok()).collect();
        if v.len() < 4 {
            continue;
        }
        let total: u64 = v.iter().sum();
        // idle + iowait are not busy.
        let idle = v[3] + v.get(4).copied().unwrap_or(0);
        out.insert(n, (total - idle, total));
    }
    out
}

/// Busy percentage per CPU between two samples.
pub fn cpu_usage(
    before: &BTreeMap<u32, (u64, u64)>,
    after: &BTreeMap<u32, (u64, u64)>,
) -> BTreeMap<u32, f64> {
    after
        .iter()
        .filter_map(|(cpu, (busy, total))| {
            let (b0, t0) = before.get(cpu)?;
            let dt = total.saturating_sub(*t0);
            let pct = if dt == 0 {
                0.0
            } else {
                100.0 * busy.saturating_sub(*b0) as f64 / dt as f64
            };
            Some((*cpu, (pct * 10.0).round() / 10.0))
        })
        .collect()
}

/// MemTotal, MemFree, MemAvailable (kB) from /proc/meminfo.
pub fn memory(meminfo: &str) -> BTreeMap<&'static str, u64> {
    let mut out = BTreeMap::new();
    for (key, name) in [
        ("MemTotal:", "total_kb"),
        ("MemFree:", "free_kb"),
        ("MemAvailable:", "available_kb"),
    ] {
        if let Some(v) = meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        {
            out.insert(name, v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  10 0 10 80 0 0 0 0 0 0\ncpu0 5 0 5 40 0 0 0 0 0 0\ncpu1 5 0 5 40 0 0 0 0 0 0\nintr 1\n";

    #[test]
    fn parses_cpu_times_and_usage() {
        let a = cpu_times(STAT);
        assert_eq!(a.len(), 2);
        assert_eq!(a[&0], (10, 50));
        let mut b = a.clone();
        b.insert(0, (60, 150)); // 50 busy of 100
        let u = cpu_usage(&a, &b);
        assert_eq!(u[&0], 50.0);
        assert_eq!(u[&1], 0.0);
    }

    #[test]
    fn parses_meminfo() {
        let m = memory("MemTotal:  1000 kB\nMemFree: 200 kB\nMemAvailable:   500 kB\n");
        assert_eq!(m["total_kb"], 1000);
        assert_eq!(m["free_kb"], 200);
        assert_eq!(m["available_kb"], 500);
    }
}
