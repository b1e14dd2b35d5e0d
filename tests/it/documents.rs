//! The documents run: the shell blocks of README.md, docs/SECURITY.md and
//! bench/README.md are pasted into bash, in order, as a newcomer would, and
//! what the documents show is compared with what comes back. A document
//! that drifts from the binary fails here.
//!
//! The convention, in the Markdown itself:
//!
//! - Every ` ```sh ` block runs, in one bash per document (the reader's
//!   terminal: variables and the working directory carry from block to
//!   block), each command with its stdin closed; a command that fails
//!   fails the test.
//! - `# ` lines right under a command (no blank line between) are what
//!   that command prints. Ids are compared with their epoch normalised
//!   (`1.1x4rup0` matches any `1.EPOCH`), and `…` stands for any text
//!   within a line.
//! - An HTML comment right before a block changes how it runs:
//!   - `<!-- doc-test: skip REASON -->`: not run (alone in its comment) (it builds, takes
//!     minutes, or needs what CI lacks); the reason says which;
//!   - `<!-- doc-test: background listening PORT… -->` or
//!     `<!-- doc-test: background output -->`: the block is a second
//!     terminal (a hub, a subscriber): it runs on its own, in the
//!     background, until the document ends; the next block waits until it
//!     listens on its ports, or has printed something;
//!   - `stop;` first (`<!-- doc-test: stop; background … -->`): Ctrl-C
//!     every background terminal before the block runs;
//!   - `<!-- doc-test: expect background -->` before a ` ```text ` block:
//!     what the latest background terminal has printed so far.
//!
//! Substituted, and nothing else: the ports the documents name (8080,
//! 8081, 8082, 8090, 8443, 6390; bare `crier` is given its port through
//! `CRIER_LISTEN`), `0.0.0.0` (the test listens on loopback only), and the
//! paths `/var/lib/crier`, `/etc/crier` and `/tmp/crier-redis`. The built
//! `crier` is first on `PATH` (what `cargo install --path .` gives), and
//! `HOME` is a directory of the test's own.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The ports the documents use, each replaced by a free one.
const PORTS: [u16; 6] = [8080, 8081, 8082, 8090, 8443, 6390];
/// The paths the documents use, each replaced by one under the test's
/// directory.
const PATHS: [&str; 3] = ["/var/lib/crier", "/etc/crier", "/tmp/crier-redis"];
/// Longest any one command or wait may take.
const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn readme_runs_as_written() {
    run_document("README.md", Cwd::Scratch);
}

#[test]
fn security_runs_as_written() {
    run_document("docs/SECURITY.md", Cwd::Scratch);
}

#[test]
fn bench_readme_runs_as_written() {
    run_document("bench/README.md", Cwd::Repository);
}

/// Where a document's commands run: a fresh directory, or the repository
/// (bench/README.md calls `bench/compare.sh`).
enum Cwd {
    Scratch,
    Repository,
}

/// What the HTML comment before a block asks for.
#[derive(Debug, Default, PartialEq)]
struct Directive {
    skip: Option<String>,
    stop: bool,
    background: Option<Wait>,
    expect_background: bool,
}

#[derive(Debug, PartialEq)]
enum Wait {
    Listening(Vec<u16>),
    Output,
}

#[derive(Debug)]
struct Block {
    lang: String,
    /// The line of the opening fence, 1-based, for messages.
    line: usize,
    text: String,
    directive: Directive,
}

/// The fenced blocks of a Markdown document, each with the directive of
/// the `<!-- doc-test: … -->` comment right before it (blank lines
/// allowed between).
fn blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut pending: Option<Directive> = None;
    let mut lines = markdown.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("<!-- doc-test:") {
            let body = rest.trim_end_matches("-->").trim();
            pending = Some(directive(body, n + 1));
            continue;
        }
        if let Some(lang) = trimmed.strip_prefix("```") {
            let mut text = String::new();
            for (_, inner) in lines.by_ref() {
                if inner.trim_start().starts_with("```") {
                    break;
                }
                text.push_str(inner);
                text.push('\n');
            }
            blocks.push(Block {
                lang: lang.trim().to_owned(),
                line: n + 1,
                text,
                directive: pending.take().unwrap_or_default(),
            });
            continue;
        }
        if !trimmed.is_empty() && pending.is_some() {
            panic!(
                "line {}: a doc-test comment must come right before a block",
                n + 1
            );
        }
    }
    blocks
}

fn directive(body: &str, line: usize) -> Directive {
    let mut directive = Directive::default();
    // A skip's reason is free text, semicolons included.
    if let Some(reason) = body.strip_prefix("skip") {
        assert!(
            !reason.trim().is_empty(),
            "line {line}: skip needs a reason"
        );
        directive.skip = Some(reason.trim().to_owned());
        return directive;
    }
    for part in body.split(';').map(str::trim) {
        let mut words = part.split_whitespace();
        match words.next() {
            Some("stop") => directive.stop = true,
            Some("background") => {
                directive.background = Some(match words.next() {
                    Some("listening") => Wait::Listening(
                        words
                            .map(|w| w.parse().expect("a port"))
                            .collect::<Vec<u16>>(),
                    ),
                    Some("output") => Wait::Output,
                    other => panic!("line {line}: background {other:?}?"),
                })
            }
            Some("expect") if words.next() == Some("background") => {
                directive.expect_background = true
            }
            other => panic!("line {line}: unknown doc-test directive {other:?}"),
        }
    }
    directive
}

/// One command of a block and the output the document shows under it.
#[derive(Debug, PartialEq)]
struct Step {
    command: String,
    line: usize,
    shown: Vec<String>,
}

/// A block's commands (backslash continuations joined; comment lines and
/// blank lines dropped), each with the `# ` lines right under it.
fn steps(text: &str, first_line: usize) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut continued: Option<(String, usize)> = None;
    // Whether the line before was a command or its shown output.
    let mut under_command = false;
    for (i, line) in text.lines().enumerate() {
        let n = first_line + 1 + i;
        if let Some((mut command, start)) = continued.take() {
            command.push('\n');
            command.push_str(line);
            match line.trim_end().ends_with('\\') {
                true => continued = Some((command, start)),
                false => steps.push(Step {
                    command,
                    line: start,
                    shown: Vec::new(),
                }),
            }
            under_command = true;
            continue;
        }
        let trimmed = line.trim();
        if trimmed.is_empty() {
            under_command = false;
            continue;
        }
        if trimmed == "#" || trimmed.starts_with("# ") {
            if under_command && let Some(step) = steps.last_mut() {
                step.shown
                    .push(trimmed.trim_start_matches('#').trim().to_owned());
            }
            continue;
        }
        under_command = true;
        match trimmed.ends_with('\\') {
            true => continued = Some((line.to_owned(), n)),
            false => steps.push(Step {
                command: line.to_owned(),
                line: n,
                shown: Vec::new(),
            }),
        }
    }
    steps
}

/// `text` with every `DIGITS.EPOCH` id's epoch written `EPOCH`, so ids of
/// two hubs compare by their numbers.
fn normalise(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let starts_number = bytes[i].is_ascii_digit() && (i == 0 || !is_word(bytes[i - 1]));
        if starts_number {
            let digits_end = i + bytes[i..].iter().take_while(|b| b.is_ascii_digit()).count();
            if bytes.get(digits_end) == Some(&b'.') {
                let epoch_len = bytes[digits_end + 1..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
                    .count();
                let epoch = &bytes[digits_end + 1..digits_end + 1 + epoch_len];
                let after = bytes.get(digits_end + 1 + epoch_len).copied();
                if epoch_len >= 4
                    && epoch.iter().any(u8::is_ascii_lowercase)
                    && !after.is_some_and(is_word)
                {
                    out.push_str(&text[i..=digits_end]);
                    out.push_str("EPOCH");
                    i = digits_end + 1 + epoch_len;
                    continue;
                }
            }
            out.push_str(&text[i..digits_end]);
            i = digits_end;
            continue;
        }
        let len = text[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&text[i..i + len]);
        i += len;
    }
    out
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'.'
}

/// Whether `actual` is what `shown` shows: line by line, ids normalised,
/// `…` standing for any text within a line.
fn matches(shown: &[String], actual: &[String]) -> bool {
    shown.len() == actual.len()
        && shown
            .iter()
            .zip(actual)
            .all(|(s, a)| line_matches(&normalise(s), &normalise(a)))
}

fn line_matches(pattern: &str, line: &str) -> bool {
    let mut parts = pattern.split('…');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = line.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    for (k, part) in parts.iter().enumerate() {
        if k + 1 == parts.len() {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

/// Everything a document's run set up, stopped and removed on drop (also
/// when the test fails).
struct Run {
    dir: tempfile::TempDir,
    ports: BTreeMap<u16, u16>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    shell: Shell,
    background: Vec<Background>,
}

/// The reader's own terminal: one bash fed command by command.
struct Shell {
    child: Child,
    stdin: ChildStdin,
    stdout: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

/// A second terminal: a block running on its own.
struct Background {
    line: usize,
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

fn run_document(path: &str, cwd: Cwd) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let markdown = std::fs::read_to_string(root.join(path)).expect("the document");
    let dir = tempfile::tempdir().expect("a scratch directory");
    let cwd = match cwd {
        Cwd::Scratch => dir.path().join("work"),
        Cwd::Repository => root.to_owned(),
    };
    std::fs::create_dir_all(dir.path().join("work")).unwrap();
    std::fs::create_dir_all(dir.path().join("home")).unwrap();
    let ports: BTreeMap<u16, u16> = PORTS.iter().map(|&p| (p, free_port())).collect();
    let bin = Path::new(env!("CARGO_BIN_EXE_crier"))
        .parent()
        .expect("the binary's directory")
        .to_owned();
    let path_var = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let env = vec![
        ("PATH".to_owned(), path_var),
        (
            "HOME".to_owned(),
            dir.path().join("home").display().to_string(),
        ),
        (
            "CRIER_LISTEN".to_owned(),
            format!("127.0.0.1:{}", ports[&8080]),
        ),
        ("NO_COLOR".to_owned(), "1".to_owned()),
    ];
    let shell = Shell::start(&env, &cwd);
    let mut run = Run {
        dir,
        ports,
        env,
        cwd,
        shell,
        background: Vec::new(),
    };
    let mut ran = 0;
    for block in blocks(&markdown) {
        let d = &block.directive;
        if d.skip.is_some() {
            continue;
        }
        if d.expect_background {
            run.expect_background(path, &block);
            continue;
        }
        if block.lang != "sh" && block.lang != "bash" {
            continue;
        }
        if d.stop {
            run.stop_background();
        }
        let text = run.substitute(&block.text);
        match &d.background {
            Some(wait) => run.start_background(path, &block, &text, wait),
            None => {
                for step in steps(&text, block.line) {
                    run.step(path, &step);
                }
            }
        }
        ran += 1;
    }
    assert!(ran > 0, "{path}: no block ran");
}

impl Run {
    /// The block as the test runs it: ports, `0.0.0.0` and paths replaced.
    fn substitute(&self, text: &str) -> String {
        let mut out = text.replace("0.0.0.0", "127.0.0.1");
        for (from, to) in &self.ports {
            out = replace_number(&out, *from, *to);
        }
        for path in PATHS {
            let to = self
                .dir
                .path()
                .join(path.trim_start_matches('/').replace('/', "-"));
            out = out.replace(path, &to.display().to_string());
        }
        out
    }

    fn step(&mut self, doc: &str, step: &Step) {
        let (status, output) = self.shell.run(&step.command);
        assert_eq!(
            status,
            0,
            "{doc}:{}: `{}` failed ({status}); it printed {output:?}; stderr: {}; background: {}",
            step.line,
            step.command,
            self.shell.stderr.lock().unwrap(),
            self.background_logs()
        );
        if !step.shown.is_empty() {
            assert!(
                matches(&step.shown, &output),
                "{doc}:{}: `{}` printed\n{}\nwhere the document shows\n{}",
                step.line,
                step.command,
                output.join("\n"),
                step.shown.join("\n")
            );
        }
    }

    fn start_background(&mut self, doc: &str, block: &Block, text: &str, wait: &Wait) {
        let mut command = Command::new("bash");
        command
            .args(["--noprofile", "--norc", "-c", text])
            .current_dir(&self.cwd)
            .env_clear()
            .envs(inherited())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().expect("bash");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        self.background.push(Background {
            line: block.line,
            child,
            stdout: stdout.clone(),
            stderr: stderr.clone(),
        });
        let started = Instant::now();
        loop {
            let ready = match wait {
                Wait::Listening(ports) => ports
                    .iter()
                    .all(|p| std::net::TcpStream::connect(("127.0.0.1", self.ports[p])).is_ok()),
                Wait::Output => !stdout.lock().unwrap().is_empty(),
            };
            if ready {
                return;
            }
            let exited = self
                .background
                .last_mut()
                .unwrap()
                .child
                .try_wait()
                .unwrap();
            assert!(
                exited.is_none() && started.elapsed() < DEADLINE,
                "{doc}:{}: the background block never became ready ({wait:?}; exited: {exited:?}); stdout: {}; stderr: {}",
                block.line,
                stdout.lock().unwrap(),
                stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn expect_background(&mut self, doc: &str, block: &Block) {
        let latest = self
            .background
            .last()
            .unwrap_or_else(|| panic!("{doc}:{}: no background block to expect", block.line));
        let shown: Vec<String> = block.text.lines().map(str::to_owned).collect();
        let started = Instant::now();
        loop {
            let printed: Vec<String> = latest
                .stdout
                .lock()
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect();
            // A stream ends its last event with a blank line; the document
            // may leave it out.
            let mut trimmed = printed.clone();
            while trimmed.last().is_some_and(|l| l.is_empty()) && trimmed.len() > shown.len() {
                trimmed.pop();
            }
            if matches(&shown, &printed) || matches(&shown, &trimmed) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{doc}:{}: the background block of line {} printed\n{}\nwhere the document shows\n{}",
                block.line,
                latest.line,
                printed.join("\n"),
                shown.join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ctrl-C in every background terminal, then waits for them to end.
    fn stop_background(&mut self) {
        for background in &self.background {
            signal_group(&background.child, libc::SIGINT);
        }
        for mut background in self.background.drain(..) {
            let started = Instant::now();
            while background.child.try_wait().unwrap().is_none() {
                if started.elapsed() > Duration::from_secs(10) {
                    signal_group(&background.child, libc::SIGKILL);
                    let _ = background.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn background_logs(&self) -> String {
        self.background
            .iter()
            .map(|b| {
                format!(
                    "[line {}: stdout {:?} stderr {:?}]",
                    b.line,
                    b.stdout.lock().unwrap(),
                    b.stderr.lock().unwrap()
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        for background in &mut self.background {
            signal_group(&background.child, libc::SIGKILL);
            let _ = background.child.wait();
        }
        signal_group(&self.shell.child, libc::SIGKILL);
        let _ = self.shell.child.wait();
    }
}

impl Shell {
    fn start(env: &[(String, String)], cwd: &Path) -> Shell {
        let mut command = Command::new("bash");
        command
            .args(["--noprofile", "--norc"])
            .current_dir(cwd)
            .env_clear()
            .envs(inherited())
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().expect("bash");
        let stdin = child.stdin.take().unwrap();
        let (lines, stdout) = channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = collect(child.stderr.take().unwrap());
        Shell {
            child,
            stdin,
            stdout,
            stderr,
        }
    }

    /// Runs one command (stdin closed) and returns its status and the
    /// lines it printed.
    fn run(&mut self, command: &str) -> (i32, Vec<String>) {
        let script = format!(
            "printf '\\n@@doc-test-begin@@\\n'\n{{\n{command}\n}} </dev/null\nprintf '\\n@@doc-test-end %s@@\\n' \"$?\"\n"
        );
        self.stdin.write_all(script.as_bytes()).expect("bash reads");
        self.stdin.flush().unwrap();
        let started = Instant::now();
        let mut output = Vec::new();
        let mut begun = false;
        loop {
            let left = DEADLINE.saturating_sub(started.elapsed());
            let line = match self.stdout.recv_timeout(left) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("`{command}` did not finish within {DEADLINE:?}; it printed {output:?}")
                }
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "bash ended during `{command}`: {}",
                    self.stderr.lock().unwrap()
                ),
            };
            if line == "@@doc-test-begin@@" {
                begun = true;
                continue;
            }
            if let Some(status) = line
                .strip_prefix("@@doc-test-end ")
                .and_then(|s| s.strip_suffix("@@"))
            {
                while output.last().is_some_and(|l: &String| l.is_empty()) {
                    output.pop();
                }
                return (status.parse().unwrap_or(-1), output);
            }
            if begun {
                output.push(line);
            }
        }
    }
}

/// The environment a newcomer's shell has, without the test's own
/// `CRIER_*` settings or cargo's variables.
fn inherited() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| {
            !k.starts_with("CRIER_")
                && !k.starts_with("CARGO")
                && !k.starts_with("RUST")
                && k != "XDG_CACHE_HOME"
        })
        .collect()
}

fn collect(stream: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let kept = text.clone();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            kept.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    text
}

fn signal_group(child: &Child, signal: i32) {
    // SAFETY: kill(2) on the process group of a child this test started
    // (it leads its own group) and has not yet reaped.
    unsafe {
        libc::kill(-(child.id() as i32), signal);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `text` with the number `from` replaced by `to` wherever it stands alone
/// (not part of a longer number).
fn replace_number(text: &str, from: u16, to: u16) -> String {
    let from = from.to_string();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(&from) {
        let before = rest[..at].chars().last();
        let after = rest[at + from.len()..].chars().next();
        out.push_str(&rest[..at]);
        if before.is_some_and(|c| c.is_ascii_digit()) || after.is_some_and(|c| c.is_ascii_digit()) {
            out.push_str(&from);
        } else {
            out.push_str(&to.to_string());
        }
        rest = &rest[at + from.len()..];
    }
    out.push_str(rest);
    out
}

#[test]
fn the_convention_reads_commands_and_what_they_show() {
    let text = "curl -X POST x \\\n  -d 'a'\n# {\"id\":\"1.1x4rup0\"}\n\n# a remark\nexport A=1\n";
    assert_eq!(
        steps(text, 0),
        vec![
            Step {
                command: "curl -X POST x \\\n  -d 'a'".into(),
                line: 1,
                shown: vec!["{\"id\":\"1.1x4rup0\"}".into()],
            },
            Step {
                command: "export A=1".into(),
                line: 6,
                shown: vec![],
            },
        ]
    );
    assert!(matches(
        &["{\"id\":\"1.1x4rup0\",\"next\":\"…\"}".into()],
        &["{\"id\":\"1.k2j9zq\",\"next\":\"whatever\"}".into()]
    ));
    assert!(!matches(
        &["{\"id\":\"1.1x4rup0\"}".into()],
        &["{\"id\":\"2.k2j9zq\"}".into()]
    ));
    assert_eq!(normalise("listen 127.0.0.1:8080"), "listen 127.0.0.1:8080");
    assert_eq!(replace_number("a:8080 18080 8080", 8080, 1), "a:1 18080 1");
}
