//! Redis's answers read as crier's: errors as `StoreError`s, values as
//! numbers, texts and receipts.

use redis::Value;

use crate::event::{Epoch, Topic};
use crate::store::{MAX_SEQ, Receipt, StoreError};

pub(super) fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

/// What a failed command means to its caller. An error a script raised
/// while it ran (a command in it refused its arguments, or the data it
/// found, or the script's own refusal, `crier: …`) and a reply of the wrong
/// type come back every time: `Rejected`. Everything else passes: no
/// connection, a timeout, a server that is loading, read-only, busy or out
/// of memory.
pub(super) fn store_error(error: redis::RedisError) -> StoreError {
    use redis::{ErrorKind, ServerErrorKind};
    let text = error.to_string();
    let refused = match error.kind() {
        ErrorKind::UnexpectedReturnType => true,
        ErrorKind::Server(ServerErrorKind::ResponseError | ServerErrorKind::ExecAbort) => {
            text.contains("user_script") || text.contains("crier:")
        }
        _ => false,
    };
    if refused {
        StoreError::Rejected(text)
    } else {
        StoreError::Unavailable(text)
    }
}

/// The `SEQ EPOCH` an idempotency record keeps, as a receipt.
pub(super) fn parse_receipt(topic: &Topic, text: &str) -> Result<Receipt, StoreError> {
    let (seq, epoch) = text.split_once(' ').ok_or_else(|| malformed("publish"))?;
    let seq = seq
        .parse()
        .ok()
        .filter(|seq| (1..=MAX_SEQ).contains(seq))
        .ok_or_else(|| malformed("publish"))?;
    let epoch = epoch.parse().map_err(|_| malformed("publish"))?;
    Ok(Receipt {
        topic: topic.clone(),
        seq,
        epoch: Epoch(epoch),
    })
}

pub(super) fn as_u64(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

pub(super) fn as_text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Whether `value` is the empty string (a stored event's answer).
pub(super) fn is_empty_text(value: &Value) -> bool {
    match value {
        Value::BulkString(b) => b.is_empty(),
        Value::SimpleString(s) => s.is_empty(),
        _ => false,
    }
}

/// A reply that is not what the scripts return: the topic's keys hold
/// something else (overwritten by hand, another program), and will next time.
pub(super) fn malformed(what: &str) -> StoreError {
    StoreError::Rejected(format!("unexpected reply from Redis to {what}"))
}
