//! fjall's journal files, read without changing them: whether one is
//! damaged before its end, told apart from the torn last batch a kill
//! leaves, and (for `crier repair`) the intact batches around the damage.
//!
//! fjall 3 recovers a journal by replaying its batches up to the first one
//! it cannot read and truncating the file there. That drops a torn tail, as
//! it should, but also, silently, every batch after a damaged one in the
//! middle, and it has no strict mode to ask for instead. So crier reads the
//! journals first, with this module, and decides before fjall opens them.
//!
//! The layout read here is fjall 3's (its `journal/entry.rs`): a batch is a
//! start marker (tag 1, item count u32, seqno u64), that many items (tag 2:
//! value type, compression, keyspace u64, key length u16, value length
//! u32, stored length u32, key, stored value) or keyspace clears (tag 4:
//! keyspace u64), and an end marker (tag 3, the xxh3 of the items' bytes,
//! the trailer `FJL\x03`); integers little-endian. (The seqno is covered
//! by no checksum: a change there goes unseen, by fjall too.) A new
//! journal is zeros (preallocated) after its last batch. The tests in
//! tests/durable.rs pin this against the fjall in Cargo.lock.

use std::ops::Range;
use std::path::{Path, PathBuf};

const START: u8 = 1;
const ITEM: u8 = 2;
const END: u8 = 3;
const CLEAR: u8 = 4;
const TRAILER: &[u8] = b"FJL\x03";

/// Bytes an entry of a batch takes at least: a keyspace clear.
const MIN_ENTRY: usize = 1 + 8;

/// A journal with bytes before its last intact batch that are no batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub file: PathBuf,
    /// Offset of the first byte that is not part of an intact batch.
    pub at: usize,
}

/// The journal files (`N.jnl`) of the fjall database at `db`, oldest first.
pub fn files(db: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<(u64, PathBuf)> = Vec::new();
    let entries = match std::fs::read_dir(db) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let number = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_suffix(".jnl"))
            .and_then(|n| n.parse().ok());
        if let Some(number) = number {
            files.push((number, path));
        }
    }
    files.sort();
    Ok(files.into_iter().map(|(_, path)| path).collect())
}

/// The first journal of `db` that is damaged, if any.
pub fn first_damage(db: &Path) -> std::io::Result<Option<Damage>> {
    let files = files(db)?;
    for (i, file) in files.iter().enumerate() {
        let bytes = std::fs::read(file)?;
        if let Some(at) = damage(&bytes, &intact(&bytes), i + 1 == files.len()) {
            return Ok(Some(Damage {
                file: file.clone(),
                at,
            }));
        }
    }
    Ok(None)
}

/// Where a journal is damaged, given its intact `batches` (from
/// [`intact`]): where they stop being one run from the start of the file.
/// After the last intact batch, bytes that are no batch are the torn tail
/// of a write a kill interrupted, in the `newest` journal (fjall writes
/// there only); an older journal was synced whole before the next one
/// began, so anything there but zeros is damage too.
pub fn damage(bytes: &[u8], batches: &[Range<usize>], newest: bool) -> Option<usize> {
    let mut expected = 0;
    for batch in batches {
        if batch.start != expected {
            return Some(expected);
        }
        expected = batch.end;
    }
    let rest = &bytes[expected.min(bytes.len())..];
    (!newest && rest.iter().any(|&b| b != 0)).then_some(expected)
}

/// Every intact batch of a journal, in order: read one after another from
/// the start; past bytes that are no batch, from the next offset where a
/// complete batch with a matching checksum starts.
pub fn intact(bytes: &[u8]) -> Vec<Range<usize>> {
    let mut batches = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match batch_at(bytes, at) {
            Some(end) => {
                batches.push(at..end);
                at = end;
            }
            None => {
                let next = (at + 1..bytes.len())
                    .filter(|&i| bytes[i] == START)
                    .find(|&i| batch_at(bytes, i).is_some());
                match next {
                    Some(next) => at = next,
                    None => break,
                }
            }
        }
    }
    batches
}

/// The end of the complete batch starting at `at`, whose checksum matches.
fn batch_at(bytes: &[u8], at: usize) -> Option<usize> {
    let mut r = Reader { bytes, at };
    if r.u8()? != START {
        return None;
    }
    let count = r.u32()? as usize;
    let _seqno = r.u64()?;
    if count > bytes.len().saturating_sub(r.at) / MIN_ENTRY {
        return None;
    }
    let items = r.at;
    for _ in 0..count {
        match r.u8()? {
            ITEM => {
                let value_type = r.u8()?;
                if !matches!(value_type, 0 | 1 | 2 | 4) {
                    return None;
                }
                if !matches!(r.u8()?, 0 | 1) {
                    return None;
                }
                let _keyspace = r.u64()?;
                let key = r.u16()? as usize;
                let _value = r.u32()?;
                let stored = r.u32()? as usize;
                r.skip(key.checked_add(stored)?)?;
            }
            CLEAR => {
                let _keyspace = r.u64()?;
            }
            _ => return None,
        }
    }
    let checksum = xxhash_rust::xxh3::xxh3_64(&bytes[items..r.at]);
    if r.u8()? != END || r.u64()? != checksum || r.take(TRAILER.len())? != TRAILER {
        return None;
    }
    Some(r.at)
}

/// Little-endian reads from a byte slice, `None` past its end.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let bytes = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(bytes)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch as fjall writes it: `items` of (keyspace, key, value).
    fn batch(seqno: u64, items: &[(u64, &[u8], &[u8])]) -> Vec<u8> {
        let mut out = vec![START];
        out.extend_from_slice(&(items.len() as u32).to_le_bytes());
        out.extend_from_slice(&seqno.to_le_bytes());
        let from = out.len();
        for (keyspace, key, value) in items {
            out.extend_from_slice(&[ITEM, 0, 0]);
            out.extend_from_slice(&keyspace.to_le_bytes());
            out.extend_from_slice(&(key.len() as u16).to_le_bytes());
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(key);
            out.extend_from_slice(value);
        }
        let checksum = xxhash_rust::xxh3::xxh3_64(&out[from..]);
        out.push(END);
        out.extend_from_slice(&checksum.to_le_bytes());
        out.extend_from_slice(TRAILER);
        out
    }

    fn journal() -> (Vec<u8>, Vec<Range<usize>>) {
        let mut bytes = Vec::new();
        let mut ranges = Vec::new();
        for seqno in 1..=4u64 {
            let data = format!("event {seqno}");
            let b = batch(seqno, &[(3, b"topic\0k", data.as_bytes()), (4, b"t", b"h")]);
            ranges.push(bytes.len()..bytes.len() + b.len());
            bytes.extend_from_slice(&b);
        }
        (bytes, ranges)
    }

    #[test]
    fn an_intact_journal_with_its_preallocated_zeros_is_one_run_of_batches() {
        let (mut bytes, ranges) = journal();
        bytes.extend_from_slice(&[0; 4096]);
        assert_eq!(intact(&bytes), ranges);
        assert_eq!(damage(&bytes, &intact(&bytes), true), None);
        assert_eq!(damage(&bytes, &intact(&bytes), false), None);
        assert!(intact(&[]).is_empty());
    }

    #[test]
    fn a_torn_last_batch_is_no_damage() {
        let (bytes, ranges) = journal();
        for cut in ranges[3].start + 1..ranges[3].end {
            let mut torn = bytes[..cut].to_vec();
            torn.extend_from_slice(&[0; 64]);
            assert_eq!(intact(&torn), ranges[..3], "cut at {cut}");
            assert_eq!(damage(&torn, &intact(&torn), true), None, "cut at {cut}");
            // Not in a journal fjall had finished with.
            assert_eq!(
                damage(&torn, &intact(&torn), false),
                Some(ranges[3].start),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn any_byte_changed_before_the_last_batch_is_damage_at_its_batch() {
        let (bytes, ranges) = journal();
        for at in 0..ranges[2].end {
            let which = ranges.iter().position(|r| r.contains(&at)).unwrap();
            // A batch's seqno is covered by no checksum in fjall's layout:
            // a change there cannot be told from a write.
            if (5..13).contains(&(at - ranges[which].start)) {
                continue;
            }
            let mut bad = bytes.clone();
            bad[at] ^= 0x5a;
            let found = intact(&bad);
            assert_eq!(
                damage(&bad, &found, true),
                Some(ranges[which].start),
                "byte {at}"
            );
            // Every other batch is still found, for repair to keep.
            let others: Vec<_> = ranges
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != which)
                .map(|(_, r)| r.clone())
                .collect();
            assert_eq!(found, others, "byte {at}");
        }
    }
}
