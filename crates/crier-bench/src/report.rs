//! Small helpers the scenarios share to put figures in their JSON result.

use serde_json::{Value, json};

use super::procfs;

/// `x` to `decimals` places, so the JSON shows no float noise.
pub fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// CPU seconds of the hub's processes and of this tool.
pub fn cpu(pids: &[u32]) -> Result<(f64, f64), String> {
    Ok((
        procfs::total_cpu_seconds(pids)?,
        procfs::cpu_seconds(std::process::id())?,
    ))
}

/// Microseconds as milliseconds, to the microsecond.
pub fn ms(us: u64) -> f64 {
    round(us as f64 / 1000.0, 3)
}

/// The p50, p99 and max of durations in µs, in ms (nearest rank); `null`s
/// when there are none.
pub fn percentiles_ms(mut us: Vec<u64>) -> Value {
    us.sort_unstable();
    let at = |q: f64| -> Option<f64> {
        let rank = ((q * us.len() as f64).ceil() as usize).max(1);
        us.get(rank - 1).map(|&v| ms(v))
    };
    json!({
        "p50": at(0.5),
        "p99": at(0.99),
        "max": us.last().map(|&v| ms(v)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let us: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(
            percentiles_ms(us),
            json!({"p50": 50.0, "p99": 99.0, "max": 100.0})
        );
        assert_eq!(
            percentiles_ms(vec![1500]),
            json!({"p50": 1.5, "p99": 1.5, "max": 1.5})
        );
        assert_eq!(
            percentiles_ms(Vec::new()),
            json!({"p50": null, "p99": null, "max": null})
        );
    }
}
