//! Compressed event streams as a browser reads them: each chunk decoded the
//! moment it arrives, by the suite's `Decompressor` (the one `crier bench`
//! uses) and by [`Plain`], an independent decoder, which must agree; and the
//! coding the current test's SSE subscribers ask for (see
//! [`on_every_store_and_coding!`](crate::on_every_store_and_coding)).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crier::compress::Decompressor;

/// The codings whose compressed units the hub shares between streams.
pub const SHARED: [&str; 3] = ["zstd", "gzip", "br"];

tokio::task_local! {
    /// The content coding the current test's SSE subscribers ask for, and
    /// how many of them did.
    static CODING: (&'static str, Arc<AtomicUsize>);
}

/// The coding the current test's SSE subscribers ask for (`None`: they ask
/// for none, and get the identity). Counts the asking subscriber.
pub fn current() -> Option<&'static str> {
    CODING
        .try_with(|(coding, asked)| {
            asked.fetch_add(1, Ordering::Relaxed);
            *coding
        })
        .ok()
}

/// Runs `test` with its SSE subscribers asking for `coding`
/// (`Accept-Encoding`), checking that they get it, and decoding on arrival.
/// Fails if none asked: a subscriber opened in a spawned task does not
/// inherit the coding, and the test would pass on a plain stream unseen.
pub async fn on<F: std::future::Future>(coding: &'static str, test: F) -> F::Output {
    let asked = Arc::new(AtomicUsize::new(0));
    let output = CODING.scope((coding, asked.clone()), test).await;
    assert!(
        asked.load(Ordering::Relaxed) > 0,
        "no SSE subscriber of this test asked for {coding}"
    );
    output
}

/// Both decoders of one stream.
pub struct OnArrival {
    coding: &'static str,
    suite: Decompressor,
    plain: Plain,
}

impl OnArrival {
    pub fn new(coding: &str) -> OnArrival {
        let coding = SHARED
            .into_iter()
            .find(|c| *c == coding)
            .expect("a shared coding");
        OnArrival {
            coding,
            suite: Decompressor::new(coding.parse().unwrap()).unwrap(),
            plain: Plain::new(coding),
        }
    }

    /// Everything `chunk` decodes to now, by both decoders (which must
    /// agree): a chunk that does not decode on arrival shows as missing
    /// text.
    pub fn decode(&mut self, chunk: &[u8]) -> Vec<u8> {
        let decoded = self
            .suite
            .decompress(chunk)
            .unwrap_or_else(|e| panic!("{}: not decodable on arrival: {e}", self.coding));
        let by_hand = self.plain.decode(chunk);
        assert_eq!(
            decoded, by_hand,
            "{}: the two decoders disagree",
            self.coding
        );
        decoded
    }
}

/// A decoder independent of the suite's `Decompressor`: the coding's own
/// crate driven by hand (raw deflate after the gzip header; zstd's
/// streaming decoder, frame after frame), and for brotli Node's zlib.
pub enum Plain {
    Gzip {
        header: usize,
        inflate: flate2::Decompress,
        ended: bool,
    },
    Zstd(Box<zstd::stream::raw::Decoder<'static>>),
    Brotli(NodeBrotli),
}

/// Node's streaming brotli decoder (`zlib.createBrotliDecompress`), one per
/// stream, in a Node process the test binary shares (started on first use;
/// it ends when the binary closes its stdin by exiting): each chunk goes in
/// with its stream's number and length, and what it decodes to once flushed
/// comes back length-prefixed, so a chunk that does not decode on arrival
/// shows as missing text.
pub struct NodeBrotli {
    stream: u32,
}

struct Node {
    /// Never waited for: it ends once the test binary has exited.
    _child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::process::ChildStdout,
}

/// A chunk's length that means "this stream ended: drop its decoder".
const NODE_CLOSE: u32 = u32::MAX;

const NODE_BROTLI: &str = r#"
const zlib = require('zlib');
const decoders = new Map();
function decoder(id) {
  let d = decoders.get(id);
  if (!d) {
    d = { z: zlib.createBrotliDecompress(), out: [] };
    d.z.on('data', (c) => d.out.push(c));
    d.z.on('error', (e) => { process.stderr.write('node brotli: ' + e.message + '\n'); process.exit(1); });
    decoders.set(id, d);
  }
  return d;
}
let buf = Buffer.alloc(0);
let busy = false;
const queue = [];
function pump() {
  while (!busy && queue.length > 0) {
    const [id, chunk] = queue.shift();
    if (chunk === null) {
      const d = decoders.get(id);
      if (d) { d.z.destroy(); decoders.delete(id); }
      continue;
    }
    busy = true;
    const d = decoder(id);
    d.z.write(chunk);
    d.z.flush(zlib.constants.BROTLI_OPERATION_FLUSH, () => setImmediate(() => {
      const body = Buffer.concat(d.out); d.out = [];
      const head = Buffer.alloc(4); head.writeUInt32BE(body.length);
      process.stdout.write(Buffer.concat([head, body]));
      busy = false; pump();
    }));
  }
}
process.stdin.on('data', (c) => {
  buf = Buffer.concat([buf, c]);
  while (buf.length >= 8) {
    const id = buf.readUInt32BE(0), n = buf.readUInt32BE(4);
    if (n === 0xFFFFFFFF) { queue.push([id, null]); buf = buf.subarray(8); continue; }
    if (buf.length < 8 + n) break;
    queue.push([id, buf.subarray(8, 8 + n)]); buf = buf.subarray(8 + n);
  }
  pump();
});
"#;

fn node() -> std::sync::MutexGuard<'static, Node> {
    use std::sync::{LazyLock, Mutex};
    static NODE: LazyLock<Mutex<Node>> = LazyLock::new(|| {
        use std::process::{Command, Stdio};
        let mut child = Command::new("node")
            .args(["-e", NODE_BROTLI])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("node, for its brotli decoder (apt-get install -y nodejs)");
        Mutex::new(Node {
            stdin: child.stdin.take().unwrap(),
            stdout: child.stdout.take().unwrap(),
            _child: child,
        })
    });
    NODE.lock().unwrap_or_else(|e| e.into_inner())
}

impl NodeBrotli {
    fn start() -> NodeBrotli {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        NodeBrotli {
            stream: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn send(node: &mut Node, stream: u32, len: u32, wire: &[u8]) {
        use std::io::Write;
        let mut head = [0; 8];
        head[..4].copy_from_slice(&stream.to_be_bytes());
        head[4..].copy_from_slice(&len.to_be_bytes());
        node.stdin.write_all(&head).unwrap();
        node.stdin.write_all(wire).unwrap();
        node.stdin.flush().unwrap();
    }

    fn decode(&mut self, wire: &[u8]) -> Vec<u8> {
        use std::io::Read;
        if wire.is_empty() {
            return Vec::new();
        }
        tokio::task::block_in_place(|| {
            let mut node = node();
            Self::send(&mut node, self.stream, wire.len() as u32, wire);
            let mut len = [0; 4];
            node.stdout
                .read_exact(&mut len)
                .expect("node decoded the chunk");
            let mut out = vec![0; u32::from_be_bytes(len) as usize];
            node.stdout.read_exact(&mut out).unwrap();
            out
        })
    }
}

impl Drop for NodeBrotli {
    fn drop(&mut self) {
        Self::send(&mut node(), self.stream, NODE_CLOSE, &[]);
    }
}

impl Plain {
    pub fn new(coding: &str) -> Plain {
        match coding {
            "gzip" => Plain::Gzip {
                header: 0,
                inflate: flate2::Decompress::new(false),
                ended: false,
            },
            "br" => Plain::Brotli(NodeBrotli::start()),
            _ => Plain::Zstd(Box::new(zstd::stream::raw::Decoder::new().unwrap())),
        }
    }

    pub fn decode(&mut self, mut wire: &[u8]) -> Vec<u8> {
        let mut out: Vec<u8> = Vec::with_capacity(wire.len() * 8 + 1024);
        match self {
            Plain::Brotli(node) => return node.decode(wire),
            Plain::Gzip {
                header,
                inflate,
                ended,
            } => {
                let skip = (10 - *header).min(wire.len());
                *header += skip;
                wire = &wire[skip..];
                let start = inflate.total_in();
                // After the final block come the trailer's 8 bytes.
                while !*ended {
                    if out.capacity() - out.len() < 1024 {
                        out.reserve(out.capacity());
                    }
                    let consumed = (inflate.total_in() - start) as usize;
                    let status = inflate
                        .decompress_vec(&wire[consumed..], &mut out, flate2::FlushDecompress::Sync)
                        .expect("valid deflate");
                    *ended = status == flate2::Status::StreamEnd;
                    let consumed = (inflate.total_in() - start) as usize;
                    if consumed == wire.len() && out.len() < out.capacity() {
                        break;
                    }
                }
            }
            Plain::Zstd(decoder) => {
                use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
                let mut input = InBuffer::around(wire);
                loop {
                    if out.capacity() - out.len() < 1024 {
                        out.reserve(out.capacity());
                    }
                    let pos = out.len();
                    let mut output = OutBuffer::around_pos(&mut out, pos);
                    let hint = decoder.run(&mut input, &mut output).expect("valid zstd");
                    let written = output.pos() - pos;
                    if hint == 0 {
                        // A frame ended: the next bytes start another.
                        decoder.reinit().unwrap();
                    }
                    if input.pos() == wire.len() && written == 0 {
                        break;
                    }
                }
            }
        }
        out
    }
}
