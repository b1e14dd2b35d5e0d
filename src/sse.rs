//! Server-Sent Events framing: pure functions from values to bytes (and
//! back, for the other transports, which read an event from its frame).
//!
//! Line breaks inside a payload (LF, CR and CRLF alike) become one `data:`
//! line each; a browser joins them back with LF, so CR and CRLF arrive as LF,
//! which is all the format can carry.

use bytes::{BufMut, Bytes, BytesMut};

/// A heartbeat: a comment line, ignored by every SSE parser, that keeps
/// proxies and load balancers from timing out a quiet stream.
pub const HEARTBEAT: &[u8] = b": heartbeat\n\n";

/// The first bytes of every stream: the reconnection delay for EventSource,
/// the position the stream starts from when the hub chose it (a stream that
/// starts "now" or at `last=N`), then a comment so that buffering proxies
/// pass the headers on at once.
///
/// An `id:` in a block without `data:` dispatches no event but sets the
/// EventSource's last event id (the SSE dispatch steps), so a client that
/// loses its connection before the first event resumes from where it
/// started, not from "now" again, and misses nothing published meanwhile.
pub fn preamble(retry_ms: u64, start: Option<&str>) -> Bytes {
    match start {
        Some(id) => Bytes::from(format!(
            "retry: {retry_ms}\nid: {id}\n: crier stream open\n\n"
        )),
        None => Bytes::from(format!("retry: {retry_ms}\n: crier stream open\n\n")),
    }
}

/// The last bytes of a stream closed to move its client to another node:
/// the reconnection delay to use, and a comment saying why. (No `data:`, so
/// no event is dispatched.)
pub fn farewell(retry_ms: u64) -> Bytes {
    Bytes::from(format!("retry: {retry_ms}\n: crier draining\n\n"))
}

/// Encodes one event. Returns the frame and the length of its `id:` line, so
/// callers can reuse the rest of the frame under a different id.
///
/// `id` and `name` must already be free of line breaks (the types in
/// `crate::event` guarantee it).
pub fn encode_event(id: &str, name: Option<&str>, data: &str) -> (Bytes, usize) {
    let mut buf = BytesMut::with_capacity(id.len() + data.len() + 32);
    put_id(&mut buf, id);
    let id_line_len = buf.len();
    if let Some(name) = name {
        buf.put_slice(b"event: ");
        buf.put_slice(name.as_bytes());
        buf.put_u8(b'\n');
    }
    put_data(&mut buf, data);
    buf.put_u8(b'\n');
    (buf.freeze(), id_line_len)
}

/// An event's name and data as an EventSource sees them, read back from its
/// SSE lines (the only form an event is kept in): the `event:` line, and the
/// `data:` lines joined with LF.
pub fn read_back(lines: &str) -> (Option<&str>, String) {
    let mut name = None;
    let mut data: Option<String> = None;
    for line in lines.split('\n') {
        if let Some(value) = line.strip_prefix("event: ") {
            name = Some(value);
        } else if let Some(value) = line.strip_prefix("data: ") {
            match &mut data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => data = Some(value.to_owned()),
            }
        }
    }
    (name, data.unwrap_or_default())
}

/// Appends an `id:` line.
pub fn put_id(buf: &mut BytesMut, id: &str) {
    buf.put_slice(b"id: ");
    buf.put_slice(id.as_bytes());
    buf.put_u8(b'\n');
}

/// How many bytes the `data:` lines of `data` take once encoded: what a
/// payload costs in memory and on the wire (each line break adds a
/// `data: ` prefix).
pub fn encoded_data_len(data: &str) -> usize {
    let bytes = data.as_bytes();
    let mut lines = 1;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => lines += 1,
            b'\r' => {
                lines += 1;
                if bytes.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    // Each line: `data: `, its text, LF; the text is the payload less its
    // line breaks.
    let breaks = bytes
        .iter()
        .filter(|b| **b == b'\n' || **b == b'\r')
        .count();
    lines * 7 + bytes.len() - breaks
}

/// Appends one `data:` line per line of `data`, splitting on CRLF, CR and LF.
fn put_data(buf: &mut BytesMut, data: &str) {
    let bytes = data.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' | b'\r' => {
                put_data_line(buf, &bytes[start..i]);
                if bytes[i] == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    put_data_line(buf, &bytes[start..]);
}

fn put_data_line(buf: &mut BytesMut, line: &[u8]) {
    buf.put_slice(b"data: ");
    buf.put_slice(line);
    buf.put_u8(b'\n');
}

/// Encodes the `reset` control event (its data is a small JSON object).
pub fn encode_control(id: &str, name: &str, json: &serde_json::Value) -> Bytes {
    encode_event(id, Some(name), &json.to_string()).0
}

/// Encodes a control event without an `id:` line, so the client's
/// `Last-Event-ID` stays at the last real event (used for `reauth`).
pub fn encode_control_without_id(name: &str, json: &serde_json::Value) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_slice(b"event: ");
    buf.put_slice(name.as_bytes());
    buf.put_u8(b'\n');
    put_data(&mut buf, &json.to_string());
    buf.put_u8(b'\n');
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(id: &str, name: Option<&str>, data: &str) -> String {
        String::from_utf8(encode_event(id, name, data).0.to_vec()).unwrap()
    }

    #[test]
    fn single_line() {
        assert_eq!(enc("1.a", None, "hi"), "id: 1.a\ndata: hi\n\n");
        assert_eq!(
            enc("1.a", Some("update"), "hi"),
            "id: 1.a\nevent: update\ndata: hi\n\n"
        );
    }

    #[test]
    fn every_line_break_splits_lines() {
        assert_eq!(
            enc("1", None, "a\nb\r\nc\rd"),
            "id: 1\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
        );
        assert_eq!(enc("1", None, "a\r\n"), "id: 1\ndata: a\ndata: \n\n");
        assert_eq!(enc("1", None, "\r\r"), "id: 1\ndata: \ndata: \ndata: \n\n");
    }

    #[test]
    fn encoded_data_len_is_what_encoding_writes() {
        for data in [
            "",
            "x",
            "a\nb",
            "a\r\nb\rc\n",
            "\n\n\n",
            "\r\r",
            "hello, world",
        ] {
            let (frame, id_len) = encode_event("1", None, data);
            assert_eq!(encoded_data_len(data), frame.len() - id_len - 1, "{data:?}");
        }
    }

    #[test]
    fn empty_payload_is_still_an_event() {
        assert_eq!(enc("1", None, ""), "id: 1\ndata: \n\n");
    }

    #[test]
    fn leading_space_survives() {
        // The parser strips exactly one space after the colon.
        assert_eq!(enc("1", None, " x"), "id: 1\ndata:  x\n\n");
    }

    #[test]
    fn id_line_length_lets_the_body_be_reused() {
        let (frame, n) = encode_event("12.ab", Some("e"), "x");
        assert_eq!(&frame[n..], b"event: e\ndata: x\n\n");
    }
}
