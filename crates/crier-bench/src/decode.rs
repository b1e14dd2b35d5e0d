//! A subscriber's side of the wire, as pure functions over bytes: the HTTP
//! response head, the body's transfer framing, SSE `data:` lines and the
//! bench's event stamp. No sockets here, so every piece is tested on slices.
//!
//! Everything is incremental and allocation-free after setup: a read may end
//! anywhere (inside a chunk-size line, an event or a stamp), and a subscriber
//! keeps only a few bytes of state between reads, which is what lets one
//! process hold tens of thousands of subscribers. A compressed body is
//! decoded between [`Body`] and [`DataLines`] by the client, with
//! [`Decompressor`](crate::coding::Decompressor), as a browser does.

use crate::coding::Codec;

/// How the body of the response is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// `Content-Length: N`.
    Length(u64),
    /// Neither: the body runs until the server closes the connection.
    UntilClose,
}

/// Longest response head accepted.
pub const MAX_HEAD: usize = 16 * 1024;

/// A response head, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// How the body is delimited.
    pub framing: Framing,
    /// Where the body starts.
    pub len: usize,
    /// The body's content coding (`Content-Encoding`); `None`: identity.
    pub coding: Option<Codec>,
    /// A WebSocket: what follows the head is frames.
    pub upgraded: bool,
}

/// Parses a response head from the start of `buf`. `Ok(None)`: not complete
/// yet, read more. Anything but a `200` whose body is identity or in a
/// coding the bench decodes (zstd, br, gzip) is an error, since the bench
/// can only count events it can read.
pub fn response_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(format!("response head longer than {MAX_HEAD} bytes"));
        }
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line.split(' ').nth(1).unwrap_or_default();
    // 101: a WebSocket handshake accepted (`--transport ws`).
    let upgraded = status == "101";
    if status != "200" && !upgraded {
        return Err(format!("subscribe answered `{status_line}`"));
    }
    let mut framing = Framing::UntilClose;
    let mut coding = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "transfer-encoding" if value.to_ascii_lowercase().contains("chunked") => {
                framing = Framing::Chunked;
            }
            "content-length" if framing != Framing::Chunked => {
                let len = value
                    .parse()
                    .map_err(|_| format!("bad content-length `{value}`"))?;
                framing = Framing::Length(len);
            }
            "content-encoding" => coding = content_coding(value)?,
            _ => {}
        }
    }
    Ok(Some(Head {
        framing: if upgraded {
            Framing::UntilClose
        } else {
            framing
        },
        len: end + 4,
        coding,
        upgraded,
    }))
}

/// The coding a `Content-Encoding` value names, if the bench can decode it
/// as a browser would; `None` for identity.
fn content_coding(value: &str) -> Result<Option<Codec>, String> {
    match value.to_ascii_lowercase().as_str() {
        "" | "identity" => Ok(None),
        "zstd" => Ok(Some(Codec::Zstd)),
        "br" => Ok(Some(Codec::Brotli)),
        "gzip" | "x-gzip" => Ok(Some(Codec::Gzip)),
        _ => Err(format!(
            "the stream is encoded as `{value}`, which the bench does not decode"
        )),
    }
}

/// Where a [`Body`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a chunk-size line's hex digits.
    Size(u64),
    /// Skipping the rest of a chunk-size line (extensions, CR).
    SizeLine(u64),
    /// Inside a chunk, or a `Content-Length` body: this many bytes to go.
    Data(u64),
    /// Skipping the CRLF after a chunk's data.
    DataEnd,
    /// Until the connection closes.
    Raw,
    /// The body is complete.
    Done,
}

/// Removes the transfer framing from a response body, read by read.
#[derive(Debug, Clone)]
pub struct Body {
    chunked: bool,
    state: State,
}

impl Body {
    pub fn new(framing: Framing) -> Body {
        let (chunked, state) = match framing {
            Framing::Chunked => (true, State::Size(0)),
            Framing::Length(0) => (false, State::Done),
            Framing::Length(n) => (false, State::Data(n)),
            Framing::UntilClose => (false, State::Raw),
        };
        Body { chunked, state }
    }

    /// Whether the whole body has been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Feeds the next bytes read from the connection and hands each piece of
    /// body data to `data`, in order.
    pub fn feed(&mut self, mut bytes: &[u8], mut data: impl FnMut(&[u8])) -> Result<(), String> {
        while let Some((&byte, rest)) = bytes.split_first() {
            match self.state {
                State::Raw => {
                    data(bytes);
                    return Ok(());
                }
                State::Data(remaining) => {
                    let n = remaining.min(bytes.len() as u64) as usize;
                    data(&bytes[..n]);
                    bytes = &bytes[n..];
                    self.state = match remaining - n as u64 {
                        0 if self.chunked => State::DataEnd,
                        0 => State::Done,
                        left => State::Data(left),
                    };
                    continue;
                }
                State::Size(size) => {
                    self.state = match (byte as char).to_digit(16) {
                        Some(digit) => State::Size(
                            size.checked_mul(16)
                                .map(|s| s + u64::from(digit))
                                .ok_or("chunk size overflows")?,
                        ),
                        None if byte == b'\n' => after_size(size),
                        None => State::SizeLine(size),
                    };
                }
                State::SizeLine(size) => {
                    if byte == b'\n' {
                        self.state = after_size(size);
                    }
                }
                State::DataEnd => match byte {
                    b'\r' => {}
                    b'\n' => self.state = State::Size(0),
                    _ => return Err("chunk data is not followed by CRLF".into()),
                },
                State::Done => return Ok(()),
            }
            bytes = rest;
        }
        Ok(())
    }
}

/// What follows a chunk-size line. The last chunk (size 0) ends the stream;
/// its trailers do not matter.
fn after_size(size: u64) -> State {
    if size == 0 {
        State::Done
    } else {
        State::Data(size)
    }
}

/// How much of a `data:` line is kept: enough for the stamp the bench puts
/// first in its events, so the padding that follows is never copied.
const KEPT: usize = 96;

/// A line of an SSE stream that the bench acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line<'a> {
    /// A `data:` line's value (its first bytes only, for a long one).
    Data(&'a [u8]),
    /// An `event:` line's value: the type of the event being read.
    Event(&'a [u8]),
    /// An `id:` line's value (`id` alone: the empty id).
    Id(&'a [u8]),
    /// An `id:` line too long to keep: its value is unknown.
    LongId,
    /// An empty line: the event read so far is complete (SSE "dispatch").
    End,
}

/// Finds the lines of an SSE stream, read by read, keeping only the first
/// [`KEPT`] bytes of each.
#[derive(Debug, Clone)]
pub struct DataLines {
    line: [u8; KEPT],
    len: usize,
    /// Bytes of the current line did not fit in `line`.
    overflow: bool,
    /// The last line ended with a CR: an LF right after it ends nothing.
    cr: bool,
}

impl Default for DataLines {
    fn default() -> Self {
        DataLines {
            line: [0; KEPT],
            len: 0,
            overflow: false,
            cr: false,
        }
    }
}

impl DataLines {
    /// Feeds the next piece of body data and hands the value of each
    /// complete `data:` line (its first bytes) to `on_data`.
    #[cfg(test)]
    pub fn feed(&mut self, bytes: &[u8], mut on_data: impl FnMut(&[u8])) {
        self.feed_lines(bytes, |line| {
            if let Line::Data(value) = line {
                on_data(value);
            }
        });
    }

    /// Feeds the next piece of body data and hands each complete line the
    /// bench acts on to `on_line`, in order. CR, LF and CRLF all end a line.
    pub fn feed_lines(&mut self, mut bytes: &[u8], mut on_line: impl FnMut(Line<'_>)) {
        loop {
            if self.cr {
                match bytes.first() {
                    None => return,
                    Some(b'\n') => bytes = &bytes[1..],
                    Some(_) => {}
                }
                self.cr = false;
            }
            let Some(end) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') else {
                break;
            };
            self.keep(&bytes[..end]);
            self.cr = bytes[end] == b'\r';
            if let Some(line) = self.classify() {
                on_line(line);
            }
            self.len = 0;
            self.overflow = false;
            bytes = &bytes[end + 1..];
        }
        self.keep(bytes);
    }

    /// What the complete line in `self.line` is, if the bench acts on it.
    fn classify(&self) -> Option<Line<'_>> {
        let line = &self.line[..self.len];
        if line.is_empty() {
            return (!self.overflow).then_some(Line::End);
        }
        let field = |name: &[u8]| -> Option<&[u8]> {
            let value = line.strip_prefix(name)?.strip_prefix(b":")?;
            Some(value.strip_prefix(b" ").unwrap_or(value))
        };
        if let Some(value) = field(b"data") {
            Some(Line::Data(value))
        } else if line == b"id" || line.starts_with(b"id:") {
            // SSE ignores an id holding a NUL.
            match (self.overflow, field(b"id").unwrap_or_default()) {
                (true, _) => Some(Line::LongId),
                (false, value) if value.contains(&0) => None,
                (false, value) => Some(Line::Id(value)),
            }
        } else if line == b"event" {
            Some(Line::Event(b""))
        } else {
            field(b"event").map(Line::Event)
        }
    }

    fn keep(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(KEPT - self.len);
        self.overflow |= n < bytes.len();
        self.line[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }
}

/// The last event id of a stream (SSE's "last event ID"), in place: what a
/// subscriber sends back as `Last-Event-ID` when it reconnects.
#[derive(Debug, Clone, Copy)]
pub struct LastId {
    id: [u8; KEPT],
    /// Length of the id; `None` once an id too long to keep was given.
    len: Option<u8>,
}

impl Default for LastId {
    fn default() -> Self {
        LastId {
            id: [0; KEPT],
            len: Some(0),
        }
    }
}

impl LastId {
    /// Takes the value of an `id:` line ([`Line::Id`] or [`Line::LongId`]).
    pub fn set(&mut self, id: Option<&[u8]>) {
        self.len = id.filter(|id| id.len() <= KEPT).map(|id| {
            self.id[..id.len()].copy_from_slice(id);
            id.len() as u8
        });
    }

    /// The id to resume after: `Ok(None)` when there is none (no id yet, or
    /// the empty id), an error when it was too long to keep.
    pub fn get(&self) -> Result<Option<&[u8]>, String> {
        match self.len {
            None => Err(format!("the last event id is longer than {KEPT} bytes")),
            Some(0) => Ok(None),
            Some(len) => Ok(Some(&self.id[..len as usize])),
        }
    }
}

/// The bench's stamp at the start of an event: `{"seq":N,"sent_us":T,…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub seq: u64,
    /// When the publisher sent it, in microseconds since the Unix epoch.
    pub sent_us: u64,
}

impl Stamp {
    /// Reads the stamp from (the start of) an event's data; `None` for data
    /// that is not a bench event.
    pub fn parse(data: &[u8]) -> Option<Stamp> {
        Some(Stamp {
            seq: number_after(data, b"\"seq\":")?,
            sent_us: number_after(data, b"\"sent_us\":")?,
        })
    }

    /// Writes the stamp as the start of a JSON object, for the publisher.
    pub fn json_prefix(&self) -> String {
        format!("{{\"seq\":{},\"sent_us\":{}", self.seq, self.sent_us)
    }
}

/// The decimal number right after the first occurrence of `key`.
pub fn number_after(data: &[u8], key: &[u8]) -> Option<u64> {
    let start = data.windows(key.len()).position(|w| w == key)? + key.len();
    data[start..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .try_fold(None::<u64>, |n, &b| {
            n.unwrap_or(0)
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(b - b'0')))
                .map(Some)
        })?
}

/// WebSocket frames from a server (unmasked), read as they arrive: each
/// complete frame is handed over with its opcode. Event frames become the
/// lines an SSE stream would have given (`id`, `data`, end), so listeners
/// do not know the transport.
#[derive(Default)]
pub struct WsFrames {
    buf: Vec<u8>,
    /// The data of the last event frame, unescaped.
    data: Vec<u8>,
    /// permessage-deflate's inflater, kept across messages.
    inflater: Option<Box<flate2::Decompress>>,
}

/// Opcodes the bench acts on (with RSV1, `0x40`, for a message compressed
/// with permessage-deflate).
pub const WS_TEXT: u8 = 0x1;
pub const WS_TEXT_DEFLATED: u8 = 0x41;
pub const WS_CLOSE: u8 = 0x8;
pub const WS_PING: u8 = 0x9;

/// A pong with no payload, masked (every client frame is), answering the
/// hub's pings.
pub const WS_PONG: [u8; 6] = [0x8a, 0x80, 0, 0, 0, 0];

impl WsFrames {
    /// Takes `bytes` read from the socket; calls `on_frame` per complete
    /// frame.
    pub fn feed(
        &mut self,
        bytes: &[u8],
        mut on_frame: impl FnMut(u8, &[u8]),
    ) -> Result<(), String> {
        self.buf.extend_from_slice(bytes);
        let mut at = 0;
        loop {
            let rest = &self.buf[at..];
            if rest.len() < 2 {
                break;
            }
            let opcode = rest[0] & 0x4f;
            if rest[1] & 0x80 != 0 {
                return Err("a masked frame from the server".into());
            }
            let (len, header) = match rest[1] & 0x7f {
                126 if rest.len() >= 4 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
                127 if rest.len() >= 10 => {
                    let mut n = [0u8; 8];
                    n.copy_from_slice(&rest[2..10]);
                    (u64::from_be_bytes(n) as usize, 10)
                }
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if rest.len() < header + len {
                break;
            }
            on_frame(opcode, &rest[header..header + len]);
            at += header + len;
        }
        self.buf.drain(..at);
        Ok(())
    }

    /// A permessage-deflate message's payload inflated (RFC 7692 §7.2.2).
    /// One inflater for the socket's life, as a client with context
    /// takeover keeps it: each message ends on a block boundary, and a
    /// message compressed alone refers to nothing before it, so no reset
    /// (which costs more than the message) is needed.
    pub fn inflate(&mut self, payload: &[u8]) -> Result<Vec<u8>, String> {
        let inflater = self
            .inflater
            .get_or_insert_with(|| Box::new(flate2::Decompress::new(false)));
        let mut input = Vec::with_capacity(payload.len() + 4);
        input.extend_from_slice(payload);
        input.extend_from_slice(&[0x00, 0x00, 0xff, 0xff]);
        let start = inflater.total_in();
        let mut out = Vec::with_capacity(payload.len() * 4 + 64);
        loop {
            let read = (inflater.total_in() - start) as usize;
            inflater
                .decompress_vec(&input[read..], &mut out, flate2::FlushDecompress::Sync)
                .map_err(|e| format!("a compressed message does not inflate: {e}"))?;
            let now = (inflater.total_in() - start) as usize;
            if now == input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            if out.len() < out.capacity() && now == read {
                return Err("a compressed message ends early".into());
            }
            out.reserve(out.capacity().max(64));
        }
    }

    /// The lines of an event frame (`{"id":…,"type":"event",…,"data":"…"}`):
    /// its id, its data unescaped, the end. Other frames give none.
    pub fn event_lines(&mut self, frame: &[u8], mut on_line: impl FnMut(Line<'_>)) {
        if !frame.starts_with(b"{\"id\":\"") || !frame.ends_with(b"\"}") {
            return;
        }
        let rest = &frame[7..];
        let Some(end) = rest.iter().position(|b| *b == b'"') else {
            return;
        };
        let id = &rest[..end];
        let Some(start) = find(frame, b",\"data\":\"") else {
            return;
        };
        let escaped = &frame[start + 9..frame.len() - 2];
        self.data.clear();
        let mut bytes = escaped.iter();
        while let Some(&b) = bytes.next() {
            if b == b'\\' {
                match bytes.next() {
                    Some(b'n') => self.data.push(b'\n'),
                    Some(b't') => self.data.push(b'\t'),
                    Some(&other) => self.data.push(other),
                    None => {}
                }
            } else {
                self.data.push(b);
            }
        }
        on_line(Line::Id(id));
        on_line(Line::Data(&self.data));
        on_line(Line::End);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Messages compressed alone (as the hub makes them) inflate one after
    /// another through the one inflater a socket keeps.
    #[test]
    fn permessage_deflate_messages_inflate_in_turn_without_a_reset() {
        let mut frames = WsFrames::default();
        for json in [
            &br#"{"id":"1.a","data":"one one one"}"#[..],
            br#"{"id":"2.a","data":"two"}"#,
        ] {
            // Raw deflate flushed with a sync marker, the marker cut off
            // (RFC 7692 §7.2.1), from a fresh compressor each time.
            let mut compress = flate2::Compress::new(flate2::Compression::default(), false);
            let mut message = Vec::with_capacity(json.len() + 64);
            compress
                .compress_vec(json, &mut message, flate2::FlushCompress::Sync)
                .unwrap();
            assert!(message.ends_with(&[0, 0, 0xff, 0xff]));
            message.truncate(message.len() - 4);
            assert_eq!(frames.inflate(&message).unwrap(), json.to_vec());
        }
    }

    #[test]
    fn websocket_event_frames_give_the_lines_of_their_sse_event() {
        let json = br#"{"id":"3.ab","type":"event","topic":"t","seq":3,"data":"{\"seq\":2,\"x\":\"a\\\\b\"}"}"#;
        let mut wire = vec![0x81, 126, 0, json.len() as u8];
        wire.extend_from_slice(json);
        wire.extend_from_slice(&[0x89, 0]);
        let mut frames = WsFrames::default();
        let mut got = Vec::new();
        // In two reads, split inside the first frame.
        for part in [&wire[..10], &wire[10..]] {
            frames
                .feed(part, |opcode, payload| got.push((opcode, payload.to_vec())))
                .unwrap();
        }
        assert_eq!(got, vec![(WS_TEXT, json.to_vec()), (WS_PING, Vec::new())]);
        let mut lines = Vec::new();
        frames.event_lines(json, |line| {
            lines.push(match line {
                Line::Id(id) => format!("id {}", String::from_utf8_lossy(id)),
                Line::Data(data) => format!("data {}", String::from_utf8_lossy(data)),
                Line::End => "end".into(),
                _ => "other".into(),
            })
        });
        assert_eq!(lines, ["id 3.ab", r#"data {"seq":2,"x":"a\\b"}"#, "end"]);
    }

    /// Feeds `input` to a body in pieces of `step` bytes; returns the data.
    fn unframe(framing: Framing, input: &[u8], step: usize) -> (Vec<u8>, bool) {
        let mut body = Body::new(framing);
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            body.feed(piece, |d| out.extend_from_slice(d)).unwrap();
        }
        (out, body.is_done())
    }

    #[test]
    fn head_gives_the_framing_and_where_the_body_starts() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n7\r\n";
        let parsed = response_head(head).unwrap().unwrap();
        assert_eq!(parsed.framing, Framing::Chunked);
        assert_eq!(parsed.coding, None);
        assert_eq!(&head[parsed.len..], b"7\r\n");
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n";
        let framing = response_head(head).unwrap().unwrap().framing;
        assert_eq!(framing, Framing::Length(12));
        let head = b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\n";
        let framing = response_head(head).unwrap().unwrap().framing;
        assert_eq!(framing, Framing::UntilClose);
    }

    #[test]
    fn head_waits_for_its_end_and_refuses_what_cannot_be_counted() {
        assert_eq!(response_head(b"HTTP/1.1 200 OK\r\nContent-").unwrap(), None);
        let err = response_head(b"HTTP/1.1 404 Not Found\r\n\r\n").unwrap_err();
        assert!(err.contains("404"), "{err}");
        let err =
            response_head(b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\n\r\n").unwrap_err();
        assert!(err.contains("deflate"), "{err}");
        let two = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip, br\r\n\r\n";
        assert!(response_head(two).is_err());
    }

    #[test]
    fn head_names_the_coding_of_a_compressed_stream() {
        let coding = |value: &str| {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Encoding: {value}\r\n\r\n");
            response_head(head.as_bytes()).unwrap().unwrap().coding
        };
        assert_eq!(coding("zstd"), Some(Codec::Zstd));
        assert_eq!(coding("br"), Some(Codec::Brotli));
        assert_eq!(coding("GZIP"), Some(Codec::Gzip));
        assert_eq!(coding("identity"), None);
    }

    #[test]
    fn chunked_body_is_unframed_whatever_the_read_boundaries() {
        let input = b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\n";
        for step in 1..input.len() {
            let (out, done) = unframe(Framing::Chunked, input, step);
            assert_eq!(out, b"helloabcdefghijklmnopqrstuvwxyz", "step {step}");
            assert!(done);
        }
        let (out, done) = unframe(Framing::Chunked, b"3\r\nabc\r\n", 2);
        assert_eq!((out.as_slice(), done), (&b"abc"[..], false));
        assert!(
            Body::new(Framing::Chunked)
                .feed(b"3\r\nabcX", |_| {})
                .is_err()
        );
    }

    #[test]
    fn length_and_close_delimited_bodies() {
        assert_eq!(
            unframe(Framing::Length(3), b"abcdef", 2),
            (b"abc".to_vec(), true)
        );
        assert_eq!(
            unframe(Framing::UntilClose, b"abcdef", 4),
            (b"abcdef".to_vec(), false)
        );
    }

    #[test]
    fn data_lines_are_found_across_reads_and_line_endings() {
        let input = b"retry: 1000\n: open\n\nid: 1\ndata: {\"seq\":1}\n\nid: 2\r\ndata:two\r\n\r\ndata: three\rdata: x";
        for step in 1..input.len() {
            let mut lines = DataLines::default();
            let mut found = Vec::new();
            for piece in input.chunks(step) {
                lines.feed(piece, |d| {
                    found.push(String::from_utf8_lossy(d).into_owned())
                });
            }
            assert_eq!(found, ["{\"seq\":1}", "two", "three"], "step {step}");
        }
    }

    #[test]
    fn long_data_lines_keep_only_their_start() {
        let mut line = b"data: ".to_vec();
        line.extend_from_slice(&[b'x'; 1000]);
        line.push(b'\n');
        let mut lines = DataLines::default();
        let mut found = Vec::new();
        lines.feed(&line, |d| found.push(d.len()));
        assert_eq!(found, [KEPT - "data: ".len()]);
    }

    /// Feeds `input` to fresh lines in pieces of `step` bytes; returns
    /// each line as text (`end` for an empty line).
    fn lines(input: &[u8], step: usize) -> Vec<String> {
        let mut lines = DataLines::default();
        let mut found = Vec::new();
        for piece in input.chunks(step) {
            lines.feed_lines(piece, |line| {
                let text = |kind: &str, v: &[u8]| format!("{kind} {}", String::from_utf8_lossy(v));
                found.push(match line {
                    Line::Data(v) => text("data", v),
                    Line::Event(v) => text("event", v),
                    Line::Id(v) => text("id", v),
                    Line::LongId => "long id".to_owned(),
                    Line::End => "end".to_owned(),
                });
            });
        }
        found
    }

    #[test]
    fn fields_and_event_ends_are_found_whatever_the_line_endings() {
        let input = b"retry: 1000\r\n: open\r\n\r\nid: 7.x\r\nevent: reset\r\ndata: {}\r\n\r\nid\ndata:a\rdata: b\r\rid: 9\x00\nevent\n\n";
        for step in 1..input.len() {
            assert_eq!(
                lines(input, step),
                [
                    "end",
                    "id 7.x",
                    "event reset",
                    "data {}",
                    "end",
                    "id ",
                    "data a",
                    "data b",
                    "end",
                    "event ",
                    "end"
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn an_id_too_long_to_keep_is_not_cut() {
        let mut input = b"id: ".to_vec();
        input.extend_from_slice(&[b'7'; 200]);
        input.extend_from_slice(b"\ndata: x\n\n");
        assert_eq!(lines(&input, 7), ["long id", "data x", "end"]);
        let mut id = LastId::default();
        id.set(None);
        assert!(id.get().is_err());
    }

    #[test]
    fn last_id_keeps_the_latest_and_empty_means_none() {
        let mut id = LastId::default();
        assert_eq!(id.get(), Ok(None));
        id.set(Some(b"17.1x4rup0"));
        assert_eq!(id.get(), Ok(Some(&b"17.1x4rup0"[..])));
        id.set(Some(b"18"));
        assert_eq!(id.get(), Ok(Some(&b"18"[..])));
        id.set(Some(b""));
        assert_eq!(id.get(), Ok(None));
    }

    #[test]
    fn stamp_round_trips_and_ignores_other_data() {
        let stamp = Stamp {
            seq: 42,
            sent_us: 1_764_000_000_123_456,
        };
        let event = format!("{},\"pad\":\"xx\"}}", stamp.json_prefix());
        assert_eq!(Stamp::parse(event.as_bytes()), Some(stamp));
        assert_eq!(Stamp::parse(b"hello"), None);
        assert_eq!(Stamp::parse(b"{\"seq\":,\"sent_us\":1}"), None);
        assert_eq!(
            Stamp::parse(b"{\"seq\":99999999999999999999999,\"sent_us\":1}"),
            None
        );
    }
}
