//! Results, percentiles and memory readings.
use serde_json::{json, Map, Value};
use std::time::Duration;

/// The outcome of one measured run.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub scenario: String,
    pub schema: String,
    pub clients: usize,
    pub events_per_append: usize,
    pub elapsed: Duration,
    /// Successful operations (appends, decisions, queries, passes).
    pub ops: u64,
    /// Events written or read by the successful operations.
    pub events: u64,
    pub ops_per_s: f64,
    pub events_per_s: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub conflicts: u64,
    pub errors: u64,
    /// Scenario-specific fields (memory, retries, ...).
    pub extra: Map<String, Value>,
}

impl RunResult {
    /// Builds a result from counters and per-operation latencies (microseconds).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        scenario: &str,
        schema: &str,
        clients: usize,
        events_per_append: usize,
        elapsed: Duration,
        ops: u64,
        events: u64,
        conflicts: u64,
        errors: u64,
        mut latencies_us: Vec<u64>,
    ) -> Self {
        latencies_us.sort_unstable();
        let secs = elapsed.as_secs_f64().max(1e-9);
        Self {
            scenario: scenario.to_string(),
            schema: schema.to_string(),
            clients,
            events_per_append,
            elapsed,
            ops,
            events,
            ops_per_s: ops as f64 / secs,
            events_per_s: events as f64 / secs,
            p50_ms: percentile(&latencies_us, 0.50),
            p95_ms: percentile(&latencies_us, 0.95),
            p99_ms: percentile(&latencies_us, 0.99),
            max_ms: latencies_us.last().map_or(0.0, |v| *v as f64 / 1000.0),
            conflicts,
            errors,
            extra: Map::new(),
        }
    }

    pub fn label(&self) -> String {
        format!("{} (clients={})", self.scenario, self.clients)
    }

    pub fn to_json(&self) -> Value {
        let mut line = json!({
            "scenario": self.scenario,
            "schema": self.schema,
            "clients": self.clients,
            "events_per_append": self.events_per_append,
            "elapsed_s": round3(self.elapsed.as_secs_f64()),
            "ops": self.ops,
            "events": self.events,
            "ops_per_s": round3(self.ops_per_s),
            "events_per_s": round3(self.events_per_s),
            "p50_ms": round3(self.p50_ms),
            "p95_ms": round3(self.p95_ms),
            "p99_ms": round3(self.p99_ms),
            "max_ms": round3(self.max_ms),
            "conflicts": self.conflicts,
            "errors": self.errors,
        });
        if let Some(map) = line.as_object_mut() {
            map.extend(self.extra.clone());
        }
        line
    }

    pub fn human(&self) -> String {
        let mut line = format!(
            "{:<14} clients={:<3} k={:<4} {:>6.2}s ops={:<8} ops/s={:>10.1} events/s={:>11.1} \
             p50={:.2}ms p95={:.2}ms p99={:.2}ms max={:.2}ms conflicts={} errors={}",
            self.scenario,
            self.clients,
            self.events_per_append,
            self.elapsed.as_secs_f64(),
            self.ops,
            self.ops_per_s,
            self.events_per_s,
            self.p50_ms,
            self.p95_ms,
            self.p99_ms,
            self.max_ms,
            self.conflicts,
            self.errors
        );
        for (key, value) in &self.extra {
            line.push_str(&format!(" {key}={value}"));
        }
        line
    }
}

/// The `p` quantile of sorted microsecond samples, in milliseconds (nearest rank).
pub fn percentile(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted_us.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted_us.len()) - 1;
    sorted_us[index] as f64 / 1000.0
}

/// Events per second of `result` over those of `base`.
pub fn ratio(result: &RunResult, base: &RunResult) -> f64 {
    if base.events_per_s <= 0.0 {
        return 0.0;
    }
    result.events_per_s / base.events_per_s
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// A `kB` field of /proc/self/status (`VmRSS`, `VmHWM`), in MiB.
pub fn proc_status_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Resets the peak RSS (`VmHWM`) of this process (Linux `clear_refs` value 5); false if the
/// kernel refused, in which case `VmHWM` is the peak since the process started.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<u64> = (1..=100).map(|v| v * 1000).collect();
        assert_eq!(percentile(&samples, 0.50), 50.0);
        assert_eq!(percentile(&samples, 0.99), 99.0);
        assert_eq!(percentile(&samples, 1.0), 100.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
