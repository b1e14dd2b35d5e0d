//! The real `crier` binary as a child process, for tests that need to signal
//! or kill it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::SseClient;

/// The `crier` binary, started on an ephemeral port. Where it overlaps
/// with the in-process [`Server`](super::Server) it has the same API
/// (`url`, `addr`, `publish`, `publish_id`, `subscribe`, `resume`, `stop`),
/// so a test reads the same whichever way it runs the hub.
pub struct Process {
    child: Child,
    pub base: String,
    pub client: reqwest::Client,
    /// Every line the process wrote to stderr (its log) so far.
    log: Arc<Mutex<Vec<String>>>,
    /// The thread that reads the log; it ends when the process does.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Process {
    pub fn start(args: &[&str]) -> Process {
        Process::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Process {
        Process::spawn(args, env, None)
    }

    /// Starts crier with its open-file limit (soft and hard) set to
    /// `open_files`.
    pub fn start_limited(args: &[&str], open_files: u64) -> Process {
        Process::spawn(args, &[], Some(open_files))
    }

    fn spawn(args: &[&str], env: &[(&str, &str)], open_files: Option<u64>) -> Process {
        let mut command = Command::new(env!("CARGO_BIN_EXE_crier"));
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            // A test may ask for another level in `env`.
            .env("RUST_LOG", "info")
            // Tests stop the binary with SIGTERM and expect it gone at once:
            // no drain (its defaults give load balancers 15 s) unless a
            // test asks for one with flags or `env`.
            .env("CRIER_DRAIN_DELAY", "0s")
            .env("CRIER_DRAIN_WINDOW", "0s")
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .stdout(Stdio::null());
        if let Some(limit) = open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs
            // between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let rlim = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().expect("start crier");
        // The first log line names the bound address.
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let log = Arc::new(Mutex::new(Vec::new()));
        let base = loop {
            let line = lines
                .next()
                .expect("crier logs its address before anything else")
                .unwrap();
            log.lock().unwrap().push(line.clone());
            if let Some(addr) = line.split("crier listening on ").nth(1) {
                // The address, then what the hub says about access control.
                break addr
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
            }
        };
        // Keep draining the log so the process never blocks on a full pipe,
        // and keep it for tests that read it.
        let kept = log.clone();
        let reader = std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        Process {
            child,
            base,
            client: super::client(),
            log,
            reader: Some(reader),
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.base
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .parse()
            .expect("a socket address")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Publishes `data` to `topic` and returns the answer's JSON.
    pub async fn publish(&self, topic: &str, data: &str) -> Value {
        self.publish_to(&format!("/topics/{topic}"), data).await
    }

    /// Publishes `data` (one event, or a batch's JSON to `/events`) to
    /// `path`, expecting `201`, and returns the answer's JSON.
    pub async fn publish_to(&self, path: &str, data: &str) -> Value {
        super::publish_with(&self.client, &self.url(path), data).await
    }

    /// Publishes and returns the event id the answer gives.
    pub async fn publish_id(&self, topic: &str, data: &str) -> String {
        super::id_of(&self.publish(topic, data).await)
    }

    pub async fn subscribe(&self, path: &str) -> SseClient {
        SseClient::connect(&self.client, &self.url(path), None).await
    }

    pub async fn resume(&self, path: &str, last_event_id: &str) -> SseClient {
        SseClient::connect(&self.client, &self.url(path), Some(last_event_id)).await
    }

    /// Stops it as an operator does (SIGTERM) and waits until it has
    /// exited, cleanly.
    pub async fn stop(mut self) {
        self.terminate();
        let deadline = Instant::now() + super::DEADLINE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "crier did not stop in time");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(status.success(), "crier exited with {status}");
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its open descriptors.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Its resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }

    /// The log lines written so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// The whole log of a process that has exited (see
    /// [`Process::wait_exit`]): every line, read to the end of the pipe.
    pub fn full_log(&mut self) -> Vec<String> {
        assert!(
            self.child.try_wait().unwrap().is_some(),
            "the whole log exists only once the process has exited"
        );
        if let Some(reader) = self.reader.take() {
            reader.join().expect("the log reader");
        }
        self.log()
    }

    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends Ctrl-C's signal.
    pub fn interrupt(&self) {
        self.signal(libc::SIGINT);
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid");
        // SAFETY: kill(2) on our own child's pid.
        let result = unsafe { libc::kill(pid, signal) };
        assert_eq!(result, 0, "{}", std::io::Error::last_os_error());
    }

    /// Waits for the process to exit, failing after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "crier did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// Kills the process with SIGKILL: no graceful anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
