//! permessage-deflate (RFC 7692) on crier's WebSockets: the handshake's
//! offers answered, and client messages inflated before tungstenite reads
//! them.
//!
//! An event's message is compressed once and its frame shared by every
//! socket (`crate::transport::websocket::event_deflated_frame`), so the
//! server never takes its context over (`server_no_context_takeover`); it asks
//! clients not to either (`client_no_context_takeover`, which RFC 7692
//! §7.1.1.2 lets a server answer unasked), so a client's message is
//! inflated alone and no socket keeps a window. tungstenite refuses every
//! frame with RSV1 set, so [`Inflating`] sits between the upgraded
//! connection and tungstenite: frames pass through as they are, and a
//! compressed message becomes the one plain frame tungstenite expects.
//! This module never writes: server frames are tungstenite's.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The extension's token in `Sec-WebSocket-Extensions`.
pub const EXTENSION: &str = "permessage-deflate";

/// What a sync flush ends with and a permessage-deflate message leaves out
/// (RFC 7692 §7.2.1).
pub const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The window crier compresses with (flate2's, 32 KiB): an offer that
/// limits the server's window below it is declined.
const WINDOW_BITS: u8 = 15;

/// The `Sec-WebSocket-Extensions` answer to the first permessage-deflate
/// offer in `offers` (the request's header values) that crier can accept,
/// or `None` to decline them all (the socket then carries plain frames).
/// An offer with an unknown, repeated or malformed parameter, or one that
/// limits the server's window below 32 KiB, is declined (§7.1).
pub fn negotiate<'a>(offers: impl IntoIterator<Item = &'a str>) -> Option<String> {
    offers
        .into_iter()
        .flat_map(|value| value.split(','))
        .find_map(answer)
}

/// The answer to one offer (`permessage-deflate; param; param=value`).
fn answer(offer: &str) -> Option<String> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(EXTENSION) {
        return None;
    }
    let mut seen: Vec<String> = Vec::new();
    let mut server_window = false;
    for part in parts {
        let (name, value) = match part.split_once('=') {
            Some((name, value)) => (name.trim(), Some(unquote(value.trim())?)),
            None => (part, None),
        };
        let name = name.to_ascii_lowercase();
        if seen.contains(&name) {
            return None;
        }
        match (name.as_str(), value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            ("server_max_window_bits", Some(bits)) => {
                if window_bits(bits)? != WINDOW_BITS {
                    return None;
                }
                server_window = true;
            }
            // Any window the client uses fits crier's inflater (32 KiB).
            ("client_max_window_bits", bits) => {
                if let Some(bits) = bits {
                    window_bits(bits)?;
                }
            }
            _ => return None,
        }
        seen.push(name);
    }
    let mut answer = format!("{EXTENSION}; server_no_context_takeover; client_no_context_takeover");
    if server_window {
        answer.push_str("; server_max_window_bits=15");
    }
    Some(answer)
}

/// A parameter's value, without the quotes a quoted-string has (§7.1:
/// `"10"` means `10`).
fn unquote(value: &str) -> Option<&str> {
    match value.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"'),
        None => Some(value),
    }
}

/// A window size parameter: 8 to 15, decimal digits only (§7.1.2).
fn window_bits(value: &str) -> Option<u8> {
    if value.is_empty() || value.len() > 2 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

/// The message crier sends for a compressed `deflated` (raw deflate,
/// sync-flushed, from a fresh compressor): without the sync flush's
/// `00 00 ff ff`, which the receiver puts back (§7.2.1). Should the
/// blocks not end with one, an empty stored block's first byte makes
/// the receiver's four bytes complete it.
pub fn message_of(deflated: bytes::Bytes) -> bytes::Bytes {
    if deflated.ends_with(&SYNC_TAIL) {
        deflated.slice(..deflated.len() - SYNC_TAIL.len())
    } else {
        let mut message = bytes::BytesMut::with_capacity(deflated.len() + 1);
        message.extend_from_slice(&deflated);
        message.extend_from_slice(&[0x00]);
        message.freeze()
    }
}

/// `prefix` as one stored deflate block (not final), which may go in
/// front of any blocks that refer to nothing before them: a socket's own
/// id in front of an event's shared compressed rest. `None` past a stored
/// block's 65,535 bytes.
pub fn stored_block(prefix: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(prefix.len()).ok()?;
    let mut block = Vec::with_capacity(prefix.len() + 5);
    block.push(0x00);
    block.extend_from_slice(&len.to_le_bytes());
    block.extend_from_slice(&(!len).to_le_bytes());
    block.extend_from_slice(prefix);
    Some(block)
}

/// Client frames as they arrive, rewritten for tungstenite: a compressed
/// message (RSV1 on its first frame; fragments gathered) becomes one plain
/// frame, masked with a zero key; every other frame passes as it is, and
/// tungstenite judges it. Pure: bytes in, bytes out.
#[derive(Debug)]
pub struct ClientFrames {
    /// A message's limit, compressed or not (`--max-batch-bytes`).
    limit: usize,
    /// The compressed message being gathered: its opcode and payload.
    message: Option<(u8, Vec<u8>)>,
    /// Set once a frame is refused: the rest goes through as it is, for
    /// tungstenite to fail the socket on.
    refused: bool,
}

/// A frame's header: 2 bytes, a 2- or 8-byte length, a 4-byte mask.
struct Header {
    first: u8,
    masked: bool,
    mask: [u8; 4],
    len: u64,
    size: usize,
}

fn header(input: &[u8]) -> Option<Header> {
    let (first, second) = (*input.first()?, *input.get(1)?);
    let masked = second & 0x80 != 0;
    let (len, mut size) = match second & 0x7f {
        126 => (
            u64::from(u16::from_be_bytes([*input.get(2)?, *input.get(3)?])),
            4,
        ),
        127 => (u64::from_be_bytes(input.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let mut mask = [0; 4];
    if masked {
        mask.copy_from_slice(input.get(size..size + 4)?);
        size += 4;
    }
    Some(Header {
        first,
        masked,
        mask,
        len,
        size,
    })
}

const FIN: u8 = 0x80;
const RSV1: u8 = 0x40;
const RSV: u8 = 0x70;
const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;

impl ClientFrames {
    pub fn new(limit: usize) -> ClientFrames {
        ClientFrames {
            limit,
            message: None,
            refused: false,
        }
    }

    /// Moves the complete frames at the front of `input` to `output`,
    /// rewritten; returns the bytes of `input` used (a partial frame is
    /// left for the next call).
    pub fn rewrite(&mut self, input: &[u8], output: &mut Vec<u8>) -> usize {
        let mut at = 0;
        while at < input.len() {
            if self.refused {
                output.extend_from_slice(&input[at..]);
                return input.len();
            }
            let Some(head) = header(&input[at..]) else {
                break;
            };
            // tungstenite refuses a frame over the limit on its header.
            if head.len > self.limit as u64 {
                self.refused = true;
                continue;
            }
            let end = at + head.size + head.len as usize;
            if input.len() < end {
                break;
            }
            let frame = &input[at..end];
            at = end;
            let opcode = head.first & 0x0f;
            let starts = self.message.is_none()
                && head.first & RSV == RSV1
                && matches!(opcode, TEXT | BINARY);
            let goes_on = self.message.is_some() && head.first & RSV == 0 && opcode == CONTINUATION;
            // A new message inside a compressed one breaks RFC 6455 §5.4.
            if self.message.is_some() && matches!(opcode, TEXT | BINARY) {
                self.fail(opcode, output);
                continue;
            }
            if !(head.masked && (starts || goes_on)) {
                output.extend_from_slice(frame);
                continue;
            }
            let (_, gathered) = self.message.get_or_insert_with(|| (opcode, Vec::new()));
            let start = gathered.len();
            gathered.extend_from_slice(&frame[head.size..]);
            for (i, byte) in gathered[start..].iter_mut().enumerate() {
                *byte ^= head.mask[i % 4];
            }
            if gathered.len() > self.limit {
                let (opcode, _) = self.message.take().unwrap_or((opcode, Vec::new()));
                self.refuse(opcode, output);
            } else if head.first & FIN != 0
                && let Some((opcode, gathered)) = self.message.take()
            {
                match inflate(gathered, self.limit) {
                    Ok(plain) => frame_into(output, opcode, &plain),
                    Err(Inflated::TooBig) => self.refuse(opcode, output),
                    Err(Inflated::Corrupt) => self.fail(opcode, output),
                }
            }
        }
        at
    }

    /// Hands on an empty frame with RSV1 set, for which tungstenite fails
    /// the socket as for any frame it cannot read, and stops.
    fn fail(&mut self, opcode: u8, output: &mut Vec<u8>) {
        self.refused = true;
        output.extend_from_slice(&[FIN | RSV1 | opcode, 0x80, 0, 0, 0, 0]);
    }

    /// Hands on a header over the limit, which tungstenite answers with
    /// its `Capacity` error (the socket closes with 1009), and stops.
    fn refuse(&mut self, opcode: u8, output: &mut Vec<u8>) {
        self.refused = true;
        output.extend_from_slice(&[FIN | opcode, 0x80 | 127]);
        output.extend_from_slice(&(self.limit as u64 + 1).to_be_bytes());
        output.extend_from_slice(&[0, 0, 0, 0]);
    }
}

/// A plain frame of `payload`, masked with a zero key (which leaves the
/// bytes as they are): a server reads only masked client frames.
fn frame_into(output: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    output.push(FIN | opcode);
    match payload.len() {
        n if n < 126 => output.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            output.push(0x80 | 126);
            output.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            output.push(0x80 | 127);
            output.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    output.extend_from_slice(&[0, 0, 0, 0]);
    output.extend_from_slice(payload);
}

enum Inflated {
    TooBig,
    Corrupt,
}

/// A compressed message's payload inflated alone (the client was asked
/// not to take context over), at most `limit` bytes.
fn inflate(mut compressed: Vec<u8>, limit: usize) -> Result<Vec<u8>, Inflated> {
    compressed.extend_from_slice(&SYNC_TAIL);
    let mut inflater = flate2::Decompress::new(false);
    let mut plain = Vec::with_capacity((compressed.len() * 4).clamp(64, limit + 1));
    loop {
        let (read, written) = (inflater.total_in(), inflater.total_out());
        let rest = &compressed[read as usize..];
        inflater
            .decompress_vec(rest, &mut plain, flate2::FlushDecompress::Sync)
            .map_err(|_| Inflated::Corrupt)?;
        if plain.len() > limit {
            return Err(Inflated::TooBig);
        }
        let done = inflater.total_in() as usize == compressed.len();
        if done && plain.len() < plain.capacity() {
            return Ok(plain);
        }
        if plain.len() == plain.capacity() {
            plain.reserve(plain.capacity().min(limit + 1 - plain.len()).max(64));
        } else if inflater.total_in() == read && inflater.total_out() == written {
            return Err(Inflated::Corrupt);
        }
    }
}

/// An upgraded connection whose client frames go through [`ClientFrames`]
/// when the socket negotiated permessage-deflate, and straight through
/// otherwise; writes always go straight through. Its buffers are empty
/// (and hold no memory) between client frames.
pub struct Inflating<S> {
    inner: S,
    frames: Option<ClientFrames>,
    /// Bytes read and not yet a complete frame.
    raw: Vec<u8>,
    /// Rewritten frames not yet read, from `at`.
    ready: Vec<u8>,
    at: usize,
}

impl<S> Inflating<S> {
    /// `limit` is a message's limit when the socket negotiated
    /// permessage-deflate; `None` leaves every frame to tungstenite.
    pub fn new(inner: S, limit: Option<usize>) -> Inflating<S> {
        Inflating {
            inner,
            frames: limit.map(ClientFrames::new),
            raw: Vec::new(),
            ready: Vec::new(),
            at: 0,
        }
    }

    /// The connection under it.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// Bytes read from the connection at a time while inflating.
const READ_CHUNK: usize = 2048;

impl<S: AsyncRead + Unpin> AsyncRead for Inflating<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let Some(frames) = this.frames.as_mut() else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        loop {
            if this.at < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.at);
                buf.put_slice(&this.ready[this.at..this.at + n]);
                this.at += n;
                if this.at == this.ready.len() {
                    this.ready = Vec::new();
                    this.at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // The peer is gone: what is left goes on as it is, then
                // the end.
                if this.raw.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.ready = std::mem::take(&mut this.raw);
                continue;
            }
            this.raw.extend_from_slice(read.filled());
            let used = frames.rewrite(&this.raw, &mut this.ready);
            this.raw.drain(..used);
            if this.raw.is_empty() {
                this.raw = Vec::new();
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Inflating<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// `data` as a permessage-deflate payload, the way a browser makes it.
    fn deflated(data: &[u8]) -> Vec<u8> {
        let mut encoder =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).unwrap();
        let out = encoder.flush_finish().unwrap();
        message_of(bytes::Bytes::from(out)).to_vec()
    }

    /// A masked client frame.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut frame = vec![first];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    #[test]
    fn the_first_acceptable_offer_is_answered_and_bad_ones_are_declined() {
        let answer = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
        assert_eq!(negotiate(["permessage-deflate"]).as_deref(), Some(answer));
        assert_eq!(
            negotiate(["permessage-deflate; client_max_window_bits"]).as_deref(),
            Some(answer)
        );
        assert_eq!(
            negotiate([
                "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=\"15\""
            ])
            .as_deref(),
            Some(format!("{answer}; server_max_window_bits=15").as_str())
        );
        // A smaller server window is declined; the next offer is taken.
        assert_eq!(
            negotiate([
                "permessage-deflate; server_max_window_bits=10",
                "permessage-deflate; client_max_window_bits=9"
            ])
            .as_deref(),
            Some(answer)
        );
        for bad in [
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=+9",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; mystery",
            "permessage-deflate; client_max_window_bits=\"9",
            "x-webkit-deflate-frame",
            "",
        ] {
            assert_eq!(negotiate([bad]), None, "{bad}");
        }
    }

    #[test]
    fn a_compressed_message_becomes_one_plain_frame_and_others_pass_as_they_are() {
        let json = br#"{"type":"publish","topic":"t","data":"hello hello hello hello"}"#;
        let compressed = deflated(json);
        let (one, two) = compressed.split_at(compressed.len() / 2);
        let ping = client_frame(FIN | 0x9, b"p");
        let plain = client_frame(FIN | TEXT, b"plain");
        let mut wire = client_frame(RSV1 | TEXT, one);
        wire.extend(&ping);
        wire.extend(client_frame(FIN | CONTINUATION, two));
        wire.extend(&plain);
        let mut frames = ClientFrames::new(1024);
        let mut output = Vec::new();
        // A byte at a time: partial frames wait for the rest.
        let mut pending = Vec::new();
        for byte in wire {
            pending.push(byte);
            let used = frames.rewrite(&pending, &mut output);
            pending.drain(..used);
        }
        assert!(pending.is_empty());
        let mut expected = ping.clone();
        expected.extend([FIN | TEXT, 0x80 | json.len() as u8, 0, 0, 0, 0]);
        expected.extend_from_slice(json);
        expected.extend(&plain);
        assert_eq!(output, expected);
    }

    #[test]
    fn a_message_inside_a_compressed_one_or_bad_deflate_data_fails_the_socket() {
        let fail = vec![FIN | RSV1 | TEXT, 0x80, 0, 0, 0, 0];
        let mut wire = client_frame(RSV1 | TEXT, &deflated(b"half"));
        wire.extend(client_frame(FIN | TEXT, b"another"));
        let mut output = Vec::new();
        ClientFrames::new(1024).rewrite(&wire, &mut output);
        assert_eq!(output, fail);
        let mut output = Vec::new();
        ClientFrames::new(1024).rewrite(&client_frame(FIN | RSV1 | TEXT, &[0xff; 3]), &mut output);
        assert_eq!(output, fail);
    }

    #[test]
    fn a_message_that_inflates_past_the_limit_is_refused_on_its_header() {
        let compressed = deflated(&[b'a'; 5000]);
        let mut frames = ClientFrames::new(1000);
        let mut output = Vec::new();
        let wire = client_frame(FIN | RSV1 | TEXT, &compressed);
        assert_eq!(frames.rewrite(&wire, &mut output), wire.len());
        let mut expected = vec![FIN | TEXT, 0x80 | 127];
        expected.extend(1001u64.to_be_bytes());
        expected.extend([0, 0, 0, 0]);
        assert_eq!(output, expected);
    }

    #[test]
    fn a_stored_prefix_in_front_of_shared_blocks_inflates_to_both() {
        let tail = message_of(crate::compress::alone(
            crate::coding::Codec::Gzip,
            b",\"type\":\"event\"}",
        ));
        let mut message = stored_block(b"{\"id\":\"a/1.1\"").unwrap();
        message.extend_from_slice(&tail);
        assert_eq!(
            inflate(message, 100).ok().as_deref(),
            Some(&b"{\"id\":\"a/1.1\",\"type\":\"event\"}"[..])
        );
    }
}
