//! Port 80's places in its total cap, and which connection gives its place up when they
//! are all taken.
//!
//! When every place is taken, a newcomer takes the place of the connection that has
//! waited longest without a request in flight, so that a flood of idle connections
//! cannot keep the CA's validation out. A connection waits from its accept, and again
//! from the end of each answer (idle between keep-alive requests); a request is in
//! flight from its full head to its answer, so a client that sends its head a byte at a
//! time is waiting all along. Only when every place holds a request in flight is the
//! newcomer refused.
//!
//! The waiting connections are kept in a B-tree ordered by when they started waiting:
//! admitting (with its eviction) and every change of state cost O(log n), never a scan.
//! There is one entry per open connection, so at most the cap: an id and a turn in each
//! of two tables and the close channel, roughly 150 bytes per connection by the sizes of
//! the types, next to the kilobytes the connection itself holds.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// The places of one listener: open connections, at most `cap` of them.
#[derive(Debug)]
pub(super) struct Places {
    cap: Option<usize>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Connection ids and waiting turns, drawn from one increasing count: a smaller
    /// turn has waited longer.
    next: u64,
    /// Open connections by id.
    open: HashMap<u64, Open>,
    /// Waiting connections (id) by the turn they started waiting.
    waiting: BTreeMap<u64, u64>,
}

#[derive(Debug)]
struct Open {
    /// Its turn in `waiting`, while it waits.
    waiting_since: Option<u64>,
    /// Dropped to close the connection: its receiver is in [`Admission::evicted`].
    _close: oneshot::Sender<Infallible>,
}

/// A connection let in.
#[derive(Debug)]
pub(super) struct Admission {
    /// Its place, given back when dropped.
    pub(super) place: Place,
    /// Resolves when another connection took its place: the connection must close.
    pub(super) evicted: oneshot::Receiver<Infallible>,
    /// Whether a waiting connection was evicted to make room for it.
    pub(super) evicted_another: bool,
}

/// A connection's place; dropping it frees the place.
#[derive(Debug)]
pub(super) struct Place {
    id: u64,
    places: Arc<Places>,
}

/// A request in flight on a connection: while it lives, the connection cannot be evicted.
#[derive(Debug)]
pub(super) struct InFlight<'a> {
    place: &'a Place,
}

impl Places {
    /// Places for `cap` connections (`None`: no cap).
    pub(super) fn new(cap: Option<usize>) -> Arc<Self> {
        Arc::new(Places {
            cap,
            state: Mutex::default(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every step, so a panic elsewhere does not spoil it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets a new connection in, waiting, evicting the connection that has waited
    /// longest if every place is taken; `None` if every place holds a request in flight.
    pub(super) fn admit(self: &Arc<Self>) -> Option<Admission> {
        let mut state = self.state();
        let mut evicted_another = false;
        if self.cap.is_some_and(|cap| state.open.len() >= cap) {
            let (_, victim) = state.waiting.pop_first()?;
            // Dropping its sender tells the connection to close.
            state.open.remove(&victim);
            evicted_another = true;
        }
        let id = state.next;
        state.next += 1;
        let (close, evicted) = oneshot::channel();
        state.open.insert(
            id,
            Open {
                waiting_since: Some(id),
                _close: close,
            },
        );
        state.waiting.insert(id, id);
        Some(Admission {
            place: Place {
                id,
                places: self.clone(),
            },
            evicted,
            evicted_another,
        })
    }

    /// Connections holding a place.
    #[cfg(test)]
    pub(super) fn open(&self) -> usize {
        self.state().open.len()
    }

    /// Connections waiting, without a request in flight.
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.state().waiting.len()
    }
}

impl Place {
    /// Marks a request in flight until the returned guard is dropped, after which the
    /// connection waits again, as the latest to start waiting.
    pub(super) fn in_flight(&self) -> InFlight<'_> {
        let mut state = self.places.state();
        let state = &mut *state;
        if let Some(turn) = state
            .open
            .get_mut(&self.id)
            .and_then(|open| open.waiting_since.take())
        {
            state.waiting.remove(&turn);
        }
        InFlight { place: self }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut state = self.place.places.state();
        let state = &mut *state;
        let turn = state.next;
        // Gone if the connection was evicted while its head was read: nothing to mark.
        let Some(open) = state.open.get_mut(&self.place.id) else {
            return;
        };
        if open.waiting_since.is_none() {
            open.waiting_since = Some(turn);
            state.waiting.insert(turn, self.place.id);
            state.next += 1;
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut state = self.places.state();
        if let Some(open) = state.open.remove(&self.id)
            && let Some(turn) = open.waiting_since
        {
            state.waiting.remove(&turn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit(places: &Arc<Places>) -> Admission {
        places
            .admit()
            .expect("a place or a waiting connection to evict")
    }

    fn is_evicted(evicted: &mut oneshot::Receiver<Infallible>) -> bool {
        matches!(
            evicted.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        )
    }

    #[test]
    fn a_newcomer_evicts_the_connection_waiting_longest_when_all_places_are_taken() {
        let places = Places::new(Some(3));
        let mut first = admit(&places);
        let mut second = admit(&places);
        let mut third = admit(&places);
        assert!(!first.evicted_another && !third.evicted_another);
        // The first answered a request since: it waits again, as the latest.
        drop(first.place.in_flight());

        let mut fourth = admit(&places);
        assert!(fourth.evicted_another);
        assert!(
            is_evicted(&mut second.evicted),
            "the longest waiting one goes"
        );
        assert!(!is_evicted(&mut first.evicted) && !is_evicted(&mut third.evicted));
        assert_eq!(places.open(), 3);

        let fifth = admit(&places);
        assert!(fifth.evicted_another);
        assert!(is_evicted(&mut third.evicted));
        assert!(!is_evicted(&mut first.evicted) && !is_evicted(&mut fourth.evicted));
        assert_eq!((places.open(), places.waiting()), (3, 3));
    }

    #[test]
    fn a_connection_with_a_request_in_flight_is_never_evicted() {
        let places = Places::new(Some(2));
        let mut busy = admit(&places);
        let mut idle = admit(&places);
        let in_flight = busy.place.in_flight();

        let newcomer = admit(&places);
        assert!(is_evicted(&mut idle.evicted));
        assert!(!is_evicted(&mut busy.evicted));
        // Every place holds a request in flight: refused, as without eviction.
        let in_flight_too = newcomer.place.in_flight();
        assert!(places.admit().is_none());
        assert!(!is_evicted(&mut busy.evicted));
        assert_eq!((places.open(), places.waiting()), (2, 0));

        // Once answered, the busy one waits again and can be evicted.
        drop(in_flight);
        assert!(admit(&places).evicted_another);
        assert!(is_evicted(&mut busy.evicted));
        drop(in_flight_too);
    }

    #[test]
    fn places_come_back_when_connections_end() {
        let places = Places::new(Some(2));
        let first = admit(&places);
        let second = admit(&places);
        drop(first);
        let third = admit(&places);
        assert!(!third.evicted_another, "a free place needs no eviction");
        drop((second, third));
        assert_eq!((places.open(), places.waiting()), (0, 0));
    }

    #[test]
    fn without_a_cap_nobody_is_evicted() {
        let places = Places::new(None);
        let held: Vec<_> = (0..1000).map(|_| admit(&places)).collect();
        assert!(held.iter().all(|a| !a.evicted_another));
        assert_eq!(places.open(), 1000);
    }

    #[test]
    fn the_tables_never_hold_more_than_the_cap_under_churn() {
        let places = Places::new(Some(64));
        let mut held = Vec::new();
        for i in 0..10_000 {
            let admission = admit(&places);
            // Some requests come and go on the way.
            if i % 3 == 0 {
                drop(admission.place.in_flight());
            }
            held.push(admission);
            held.retain_mut(|a| !is_evicted(&mut a.evicted));
            assert!(places.open() <= 64 && places.waiting() <= 64);
        }
        assert_eq!(held.len(), 64);
    }
}
