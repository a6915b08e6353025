//! Byte budgets for request bodies kept in memory so that they can be sent again to
//! another upstream: one budget per client connection and one for the whole edge. A body
//! that does not fit both streams through once, unretried, so the memory the edge holds
//! for replay is bounded per connection (h2 multiplexes many requests on one) and in
//! total, whatever the clients send.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::metrics::{BudgetLabels, EdgeMetrics};

/// The edge-wide budget, and what it reports to the metrics.
#[derive(Debug)]
pub(crate) struct ReplayBudget {
    total: Arc<Semaphore>,
    per_conn: usize,
    counters: Arc<Counters>,
}

#[derive(Debug)]
struct Counters {
    /// Bytes reserved now, across the edge.
    held: Gauge,
    /// Bodies that streamed once because the connection's budget was spent.
    refused_conn: Counter,
    /// Bodies that streamed once because the edge's budget was spent.
    refused_total: Counter,
}

/// Which budget was spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spent {
    Connection,
    Total,
}

impl ReplayBudget {
    /// `per_conn` and `total` in bytes (0: no body is kept for replay), reported in
    /// `metrics`.
    pub fn new(per_conn: usize, total: usize, metrics: &EdgeMetrics) -> Self {
        let refused = |budget: &str| {
            metrics
                .retry_buffer_refused
                .get_or_create(&BudgetLabels {
                    budget: budget.to_owned(),
                })
                .clone()
        };
        Self::with_counters(
            per_conn,
            total,
            metrics.retry_buffer_bytes.clone(),
            refused("connection"),
            refused("total"),
        )
    }

    fn with_counters(
        per_conn: usize,
        total: usize,
        held: Gauge,
        refused_conn: Counter,
        refused_total: Counter,
    ) -> Self {
        ReplayBudget {
            total: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
            per_conn: per_conn.min(Semaphore::MAX_PERMITS),
            counters: Arc::new(Counters {
                held,
                refused_conn,
                refused_total,
            }),
        }
    }

    /// A fresh budget for one client connection, drawing on the edge's.
    pub fn connection(&self) -> ConnBudget {
        ConnBudget {
            conn: Arc::new(Semaphore::new(self.per_conn)),
            total: self.total.clone(),
            counters: self.counters.clone(),
        }
    }
}

/// One connection's budget; the requests of the connection share it.
#[derive(Debug, Clone)]
pub(crate) struct ConnBudget {
    conn: Arc<Semaphore>,
    total: Arc<Semaphore>,
    counters: Arc<Counters>,
}

impl ConnBudget {
    /// Reserves `bytes` from the connection's budget and the edge's, both or neither, or
    /// says which is spent (and counts the refusal). Never waits: a body that does not
    /// fit now streams through instead.
    pub fn reserve(&self, bytes: u64) -> Result<Reservation, Spent> {
        let spent = |which| {
            match which {
                Spent::Connection => self.counters.refused_conn.inc(),
                Spent::Total => self.counters.refused_total.inc(),
            };
            which
        };
        let Ok(permits) = u32::try_from(bytes) else {
            return Err(spent(Spent::Connection));
        };
        let conn = self
            .conn
            .clone()
            .try_acquire_many_owned(permits)
            .map_err(|_| spent(Spent::Connection))?;
        // On refusal here, `conn` drops and goes back at once.
        let total = self
            .total
            .clone()
            .try_acquire_many_owned(permits)
            .map_err(|_| spent(Spent::Total))?;
        let bytes = i64::from(permits);
        self.counters.held.inc_by(bytes);
        Ok(Reservation {
            _conn: conn,
            _total: total,
            bytes,
            held: self.counters.held.clone(),
        })
    }
}

/// Bytes held for one body; given back to both budgets when dropped, on every path.
#[derive(Debug)]
pub(crate) struct Reservation {
    _conn: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
    bytes: i64,
    held: Gauge,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.held.dec_by(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(per_conn: usize, total: usize) -> (ReplayBudget, Gauge, Counter, Counter) {
        let (held, conn, all) = (Gauge::default(), Counter::default(), Counter::default());
        let budget =
            ReplayBudget::with_counters(per_conn, total, held.clone(), conn.clone(), all.clone());
        (budget, held, conn, all)
    }

    #[test]
    fn a_connection_cannot_hold_more_than_its_budget() {
        let (budget, held, refused_conn, _) = budget(100, 1000);
        let conn = budget.connection();
        let first = conn.reserve(60);
        assert!(first.is_ok());
        assert_eq!(conn.reserve(60).err(), Some(Spent::Connection));
        assert_eq!(refused_conn.get(), 1);
        assert_eq!(held.get(), 60);
        drop(first);
        assert_eq!(held.get(), 0);
        assert!(conn.reserve(100).is_ok(), "released on drop");
    }

    #[test]
    fn connections_share_the_total() {
        let (budget, held, refused_conn, refused_total) = budget(100, 150);
        let (a, b) = (budget.connection(), budget.connection());
        let held_a = a.reserve(100);
        assert!(held_a.is_ok());
        assert_eq!(b.reserve(60).err(), Some(Spent::Total));
        assert_eq!((refused_conn.get(), refused_total.get()), (0, 1));
        // The refusal by the total gave the connection's part back.
        assert!(b.reserve(50).is_ok());
        assert_eq!(held.get(), 100, "the 50 just reserved were dropped again");
        drop(held_a);
        assert!(b.reserve(100).is_ok());
    }

    #[test]
    fn a_zero_budget_keeps_nothing_and_huge_asks_are_refused() {
        let (budget, _, _, _) = budget(0, 0);
        assert_eq!(
            budget.connection().reserve(1).err(),
            Some(Spent::Connection)
        );
        assert!(budget.connection().reserve(0).is_ok());
        let (budget, _, _, _) = budget_big();
        assert_eq!(
            budget.connection().reserve(u64::MAX).err(),
            Some(Spent::Connection)
        );
    }

    fn budget_big() -> (ReplayBudget, Gauge, Counter, Counter) {
        budget(usize::MAX, usize::MAX)
    }

    #[test]
    fn an_edge_config_is_capped_by_default() {
        let config = super::super::EdgeConfig::new(Vec::new());
        assert_eq!(config.max_conns, Some(10_000));
        assert_eq!(config.max_conns_per_ip, Some(4096));
        assert_eq!(config.h2_max_streams, 128);
        assert_eq!(config.retry_buffer_per_conn, 1024 * 1024);
        assert_eq!(config.retry_buffer_total, 64 * 1024 * 1024);
        assert_eq!(config.max_header_size, 16 * 1024);
    }
}
