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

/// The process listening on `port` (a local hub), so `--pid` need not be
/// looked up by hand: the listening sockets of `/proc/net/tcp` and `tcp6`
/// on that port, then the process holding one of them among
/// `/proc/*/fd`. Only this user's processes can be seen.
pub fn listening_pid(port: u16) -> Result<u32, String> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            inodes.extend(listening_inodes(&text, port));
        }
    }
    if inodes.is_empty() {
        return Err(format!(
            "nothing listens on port {port} of this machine: start the hub, or give its --pid"
        ));
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let mut pids = Vec::new();
    let procs = std::fs::read_dir("/proc").map_err(|e| format!("cannot read /proc: {e}"))?;
    for entry in procs.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Another user's process: its descriptors cannot be read.
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.filter_map(Result::ok).any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|link| wanted.iter().any(|w| link.as_os_str() == w.as_str()))
        });
        if holds {
            pids.push(pid);
        }
    }
    match pids.as_slice() {
        [pid] => Ok(*pid),
        [] => Err(format!(
            "the process listening on port {port} belongs to another user: give its --pid"
        )),
        several => Err(format!(
            "several processes hold the socket listening on port {port} ({several:?}): give the hub's --pid"
        )),
    }
}

/// The inodes of the listening sockets on `port` in a `/proc/net/tcp`
/// table (`sl local rem st … inode`; `0A` is LISTEN; the port is hex).
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit(':').next()?;
            let listening = *fields.get(3)? == "0A";
            let matches = u16::from_str_radix(local_port, 16).ok()? == port;
            (listening && matches).then(|| fields.get(9)?.parse().ok())?
        })
        .collect()
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

    #[test]
    fn finds_the_process_listening_on_a_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(listening_pid(port), Ok(std::process::id()));
        drop(listener);
        let refusal = listening_pid(port).unwrap_err();
        assert!(refusal.contains("nothing listens on port"), "{refusal}");
    }

    #[test]
    fn reads_listening_sockets_of_a_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0 100 0 0 10 0\n\
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 4343 1 0 20 4 30 10 -1\n";
        assert_eq!(listening_inodes(table, 8080), vec![4242]);
        assert!(listening_inodes(table, 8081).is_empty());
    }
}
