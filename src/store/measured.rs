//! A store that counts: wraps the configured store so every operation the
//! hub's callers make is timed (append, read) and its failures counted, in
//! one place rather than in each store. (A store's own work, such as the
//! Redis store's catch-up reads after a reconnect, is not seen here: it has
//! metrics of its own.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Appended, History, NewEvent, Once, Store, StoreError};
use crate::event::{Event, Topic};
use crate::metrics::{Idempotency, Metrics, PublishResult, StoreErrorKind, StoreOp};

pub struct Measured {
    inner: Arc<dyn Store>,
    metrics: Metrics,
}

impl Measured {
    pub fn new(inner: Arc<dyn Store>, metrics: Metrics) -> Measured {
        Measured { inner, metrics }
    }

    fn failed<T>(&self, op: StoreOp, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(error) = &result {
            let kind = match error {
                StoreError::Unavailable(_) | StoreError::Config(_) | StoreError::Stalled(_) => {
                    StoreErrorKind::Unavailable
                }
                StoreError::Rejected(_) => StoreErrorKind::Rejected,
                StoreError::Full(_) => StoreErrorKind::Full,
                // The request's fault, not the store's: counted apart.
                StoreError::KeyReused { .. } | StoreError::SpansPartitions => return result,
            };
            self.metrics.store_failed(op, kind);
        }
        result
    }
}

/// What became of the events of an append, for the metrics.
fn outcome<T>(result: &Result<T, StoreError>) -> PublishResult {
    match result {
        Ok(_) => PublishResult::Stored,
        Err(StoreError::Full(_)) => PublishResult::StorageFull,
        Err(StoreError::Rejected(_)) => PublishResult::StoreError,
        Err(_) => PublishResult::StoreUnavailable,
    }
}

#[async_trait]
impl Store for Measured {
    async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Arc<Event>>, StoreError> {
        let n = events.len();
        let start = Instant::now();
        let result = self.inner.append(events).await;
        self.metrics.store_took(StoreOp::Append, start.elapsed());
        self.metrics.published(outcome(&result), n);
        self.failed(StoreOp::Append, result)
    }

    async fn append_once(
        &self,
        events: Vec<(NewEvent, Option<Once>)>,
        window: Duration,
    ) -> Result<Vec<Appended>, StoreError> {
        let n = events.len();
        let start = Instant::now();
        let result = self.inner.append_once(events, window).await;
        self.metrics.store_took(StoreOp::Append, start.elapsed());
        match &result {
            Ok(appended) => {
                let replayed = appended
                    .iter()
                    .filter(|a| matches!(a, Appended::Replayed(_)))
                    .count();
                self.metrics.published(PublishResult::Stored, n - replayed);
                self.metrics.idempotency(Idempotency::Replayed, replayed);
            }
            Err(StoreError::KeyReused { .. }) => {
                self.metrics.idempotency(Idempotency::Mismatch, 1);
            }
            Err(_) => self.metrics.published(outcome(&result), n),
        }
        self.failed(StoreOp::Append, result)
    }

    async fn read(&self, topic: &Topic, after: u64, limit: usize) -> Result<History, StoreError> {
        let start = Instant::now();
        let result = self.inner.read(topic, after, limit).await;
        self.metrics.store_took(StoreOp::Read, start.elapsed());
        self.failed(StoreOp::Read, result)
    }

    async fn watch(&self, topic: &Topic) -> Result<(), StoreError> {
        let result = self.inner.watch(topic).await;
        self.failed(StoreOp::Watch, result)
    }

    async fn put_ticket(&self, key: &str, record: &str, ttl: Duration) -> Result<(), StoreError> {
        let result = self.inner.put_ticket(key, record, ttl).await;
        self.failed(StoreOp::Ticket, result)
    }

    async fn take_ticket(&self, key: &str) -> Result<Option<String>, StoreError> {
        let result = self.inner.take_ticket(key).await;
        self.failed(StoreOp::Ticket, result)
    }

    async fn close(&self) {
        self.inner.close().await
    }

    async fn check(&self) -> Result<(), StoreError> {
        // Readiness probes are not store work; their answer is /readyz's.
        self.inner.check().await
    }
}
