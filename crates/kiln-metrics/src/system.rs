//! Host CPU utilisation and memory from `/proc` (Linux), as Triton's `nv_cpu_*` gauges.
use std::sync::Mutex;

/// Busy and total jiffies summed over all CPUs.
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait are not busy.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// Utilisation between consecutive scrapes (the first one: since boot).
#[derive(Default)]
pub struct CpuSampler {
    last: Mutex<Option<(u64, u64)>>,
}

impl CpuSampler {
    /// Fraction of CPU time busy since the previous call, in [0, 1].
    pub fn utilization(&self) -> Option<f64> {
        let now = cpu_times()?;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let (busy0, total0) = last.unwrap_or((0, 0));
        *last = Some(now);
        let (busy, total) = (now.0.saturating_sub(busy0), now.1.saturating_sub(total0));
        (total > 0).then(|| (busy as f64 / total as f64).clamp(0.0, 1.0))
    }
}

/// (total, used) bytes of RAM; used = total - available.
pub fn memory() -> Option<(u64, u64)> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|kb| kb * 1024)
    };
    let total = field("MemTotal:")?;
    let avail = field("MemAvailable:")?;
    Some((total, total.saturating_sub(avail)))
}
