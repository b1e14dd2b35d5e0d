//! The process as an operator sees it: the real binary, started and stopped.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The `crier` binary, started on an ephemeral port.
struct Process {
    child: Child,
    base: String,
}

impl Process {
    fn start(args: &[&str]) -> Process {
        Process::start_with_env(args, &[])
    }

    fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crier"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start crier");
        // The first log line names the bound address.
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let base = loop {
            let line = lines
                .next()
                .expect("crier logs its address before anything else")
                .unwrap();
            if let Some(addr) = line.split("crier listening on ").nth(1) {
                break addr.trim().to_owned();
            }
        };
        // Keep draining the log so the process never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Process { child, base }
    }

    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits for the process to exit, failing after `within`.
    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_streams_cleanly_and_exits_promptly() {
    let mut crier = Process::start(&["--shutdown-timeout", "5s"]);
    let client = common::client();
    let mut sub = SseClient::connect(&client, &format!("{}/topics/t", crier.base), None).await;
    let answer: serde_json::Value = client
        .post(format!("{}/topics/t", crier.base))
        .body("before shutdown")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = answer["id"].as_str().unwrap();
    assert_eq!(sub.next().await, Ev::new(id, "message", "before shutdown"));

    let stopping = Instant::now();
    crier.terminate();
    // The stream ends with a proper end of body, not a reset connection.
    assert_eq!(sub.until_end().await, vec![]);
    let status = tokio::task::spawn_blocking(move || crier.wait_exit(DEADLINE))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "open streams must not hold the shutdown for its whole timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_documents_every_setting_with_its_environment_variable() {
    let output = Command::new(env!("CARGO_BIN_EXE_crier"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    for (flag, env) in [
        ("--listen", "CRIER_LISTEN"),
        ("--retention-events", "CRIER_RETENTION_EVENTS"),
        ("--retention-age", "CRIER_RETENTION_AGE"),
        ("--max-event-bytes", "CRIER_MAX_EVENT_BYTES"),
        ("--max-batch-bytes", "CRIER_MAX_BATCH_BYTES"),
        ("--max-batch-events", "CRIER_MAX_BATCH_EVENTS"),
        ("--max-topic-len", "CRIER_MAX_TOPIC_LEN"),
        (
            "--max-topics-per-subscription",
            "CRIER_MAX_TOPICS_PER_SUBSCRIPTION",
        ),
        ("--subscriber-backlog", "CRIER_SUBSCRIBER_BACKLOG"),
        ("--heartbeat", "CRIER_HEARTBEAT"),
        ("--retry", "CRIER_RETRY"),
        ("--shutdown-timeout", "CRIER_SHUTDOWN_TIMEOUT"),
        ("--cors-origins", "CRIER_CORS_ORIGINS"),
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
        assert!(help.contains(env), "{env} missing from --help");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_are_read_from_the_environment() {
    let crier = Process::start_with_env(&[], &[("CRIER_MAX_EVENT_BYTES", "4")]);
    let base = &crier.base;
    let client = common::client();
    let small = client
        .post(format!("{base}/topics/t"))
        .body("1234")
        .send()
        .await
        .unwrap();
    assert_eq!(small.status(), 201);
    let big = client
        .post(format!("{base}/topics/t"))
        .body("12345")
        .send()
        .await
        .unwrap();
    assert_problem(big, 413, "payload-too-large").await;
}
