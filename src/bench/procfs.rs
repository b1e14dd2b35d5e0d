//! CPU time and memory of processes, read from Linux's `/proc`, so the bench
//! can put a hub's cost (and its own) next to the work it measured without
//! any cooperation from the hub.

/// Clock ticks per second of `/proc/PID/stat` times: the kernel reports them
/// in USER_HZ, which is 100 on every architecture Linux supports today
/// (what `sysconf(_SC_CLK_TCK)` answers).
const TICKS_PER_SECOND: f64 = 100.0;

fn read(pid: u32, file: &str) -> Result<String, String> {
    let path = format!("/proc/{pid}/{file}");
    std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))
}

/// User plus system CPU time used so far by all threads of `pid`, in
/// seconds (10 ms resolution).
pub fn cpu_seconds(pid: u32) -> Result<f64, String> {
    let (user, system) = cpu_times(pid)?;
    Ok(user + system)
}

/// User and system CPU time used so far by all threads of `pid`, in
/// seconds (10 ms resolution).
pub fn cpu_times(pid: u32) -> Result<(f64, f64), String> {
    let stat = read(pid, "stat")?;
    // The command name (field 2) may hold spaces and parentheses: count
    // fields after its closing parenthesis. utime and stime are fields 14
    // and 15, so the 12th and 13th after it.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> Result<u64, String> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("unexpected /proc/{pid}/stat: {stat}"))
    };
    Ok((
        ticks(11)? as f64 / TICKS_PER_SECOND,
        ticks(12)? as f64 / TICKS_PER_SECOND,
    ))
}

/// A memory figure of `pid` from `/proc/PID/status` (`VmRSS`: resident now,
/// `VmHWM`: peak resident), in bytes.
pub fn memory_bytes(pid: u32, field: &str) -> Result<u64, String> {
    let status = read(pid, "status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status"))
}

/// Open file descriptors of `pid` (sockets included): the entries of
/// `/proc/PID/fd`.
pub fn open_descriptors(pid: u32) -> Result<usize, String> {
    let path = format!("/proc/{pid}/fd");
    std::fs::read_dir(&path)
        .map(Iterator::count)
        .map_err(|e| format!("cannot read {path}: {e}"))
}

/// CPU seconds summed over `pids`.
pub fn total_cpu_seconds(pids: &[u32]) -> Result<f64, String> {
    pids.iter().map(|&pid| cpu_seconds(pid)).sum()
}

/// User-space CPU seconds summed over `pids`.
pub fn total_user_seconds(pids: &[u32]) -> Result<f64, String> {
    pids.iter().map(|&pid| Ok(cpu_times(pid)?.0)).sum()
}

/// A memory figure summed over `pids`.
pub fn total_memory_bytes(pids: &[u32], field: &str) -> Result<u64, String> {
    pids.iter().map(|&pid| memory_bytes(pid, field)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(cpu_seconds(me).unwrap() >= 0.0);
        let rss = memory_bytes(me, "VmRSS").unwrap();
        let peak = memory_bytes(me, "VmHWM").unwrap();
        assert!(rss > 0 && peak > 0, "rss {rss}, peak {peak}");
        assert!(memory_bytes(me, "VmNothing").is_err());
        // Other tests open and close files meanwhile: at least stdin,
        // stdout and stderr.
        assert!(open_descriptors(me).unwrap() >= 3);
        assert!(open_descriptors(u32::MAX).is_err());
    }
}
