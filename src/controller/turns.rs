//! Turns: who reconciles next when every reconcile slot is taken.
//!
//! kube-runtime's controller, at its concurrency limit, parks the requests that fall due in
//! a hash set and takes them in the set's order, which is the same order every time: under
//! a sustained overload (more refreshes due per second than the operator can do) the same
//! objects win every turn and the rest are never reconciled again. The soak found it:
//! 1,000 pushed secrets refreshed every 10 s, 286 of them never took a change.
//!
//! So the ManagedSecret controller runs with no limit of its own and every reconcile takes
//! a turn here first: at most `slots` at once, handed out in turn across namespaces (one
//! namespace holding thousands of secrets never delays another's), and within a namespace
//! the secrets waiting for their first sync at their generation before routine refreshes,
//! each lane first come first served.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::{oneshot, watch};

/// Which lane of its namespace a reconcile waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// New or changed, not synced at its generation yet.
    Urgent,
    /// A refresh, a retry, a wake-up.
    Routine,
}

/// The waiting lines: a pure structure (no locking, no tasks), `T` being whatever wakes a
/// waiter.
#[derive(Debug)]
pub struct Lines<T> {
    free: usize,
    waiting: HashMap<String, (VecDeque<T>, VecDeque<T>)>,
    /// Namespaces with someone waiting, in the order of their next turn.
    ring: VecDeque<String>,
    len: usize,
}

impl<T> Lines<T> {
    /// Lines with `slots` turns to hand out (at least one).
    pub fn new(slots: usize) -> Self {
        Lines {
            free: slots.max(1),
            waiting: HashMap::new(),
            ring: VecDeque::new(),
            len: 0,
        }
    }

    /// A reconcile of a secret in `namespace` arrives: `Some(waiter)` back when it may run
    /// at once, `None` when it waits for its turn.
    pub fn arrive(&mut self, namespace: &str, lane: Lane, waiter: T) -> Option<T> {
        if self.free > 0 {
            debug_assert!(self.ring.is_empty(), "a free turn while someone waits");
            self.free -= 1;
            return Some(waiter);
        }
        let lines = match self.waiting.get_mut(namespace) {
            Some(lines) => lines,
            None => {
                self.ring.push_back(namespace.to_owned());
                self.waiting.entry(namespace.to_owned()).or_default()
            }
        };
        match lane {
            Lane::Urgent => lines.0.push_back(waiter),
            Lane::Routine => lines.1.push_back(waiter),
        }
        self.len += 1;
        None
    }

    /// A turn ends: the next waiter (the next namespace in the ring, its urgent lane first),
    /// or `None` when nobody waits (the turn is free again).
    pub fn leave(&mut self) -> Option<T> {
        let Some(namespace) = self.ring.pop_front() else {
            self.free += 1;
            return None;
        };
        let lines = self
            .waiting
            .get_mut(&namespace)
            .expect("a namespace in the ring has lines");
        let next = lines
            .0
            .pop_front()
            .or_else(|| lines.1.pop_front())
            .expect("a namespace in the ring has a waiter");
        self.len -= 1;
        if lines.0.is_empty() && lines.1.is_empty() {
            self.waiting.remove(&namespace);
        } else {
            self.ring.push_back(namespace);
        }
        Some(next)
    }

    /// How many wait.
    fn len(&self) -> usize {
        self.len
    }

    /// Whether nobody waits.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The turns of one controller, shared by its reconciles.
#[derive(Debug)]
pub struct Turns {
    lines: Mutex<Lines<oneshot::Sender<Turn>>>,
    /// Set when the controller stops (shutdown, leadership lost): no turn is handed out
    /// after it, and every waiter gives up.
    closed: watch::Sender<bool>,
}

/// A turn to reconcile; the next waiter's turn begins when it is dropped.
#[derive(Debug)]
pub struct Turn {
    turns: Option<Arc<Turns>>,
}

impl Turns {
    /// Turns for `slots` reconciles at once.
    pub fn new(slots: usize) -> Arc<Self> {
        Arc::new(Turns {
            lines: Mutex::new(Lines::new(slots)),
            closed: watch::Sender::new(false),
        })
    }

    /// Waits for a turn of a secret in `namespace`; `None` once the controller stops (a
    /// reconcile that waited must not run after leadership is lost).
    pub async fn take(self: &Arc<Self>, namespace: &str, lane: Lane) -> Option<Turn> {
        let mut closed = self.closed.subscribe();
        if *closed.borrow_and_update() {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let now = self.lock().arrive(namespace, lane, tx).is_some();
        let turn = match now {
            true => Turn {
                turns: Some(self.clone()),
            },
            false => tokio::select! {
                biased;
                // The waiter goes; a turn sent to it meanwhile is dropped with it and passed on.
                _ = closed.wait_for(|c| *c) => return None,
                turn = rx => match turn {
                    Ok(turn) => turn,
                    // Unreachable: a waiter's sender is only dropped after sending to it.
                    Err(_) => Turn { turns: None },
                },
            },
        };
        // Closed while the turn came: handed on at once.
        (!*self.closed.borrow()).then_some(turn)
    }

    /// Stops handing out turns: every waiter and every later `take` gets `None`.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// How many reconciles wait for a turn.
    pub fn waiting(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lines<oneshot::Sender<Turn>>> {
        // The lines are consistent after any panic (each change is one push or pop).
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A turn ended: hands it to the next waiter still waiting (a waiter whose reconcile
    /// was dropped, at shutdown, is skipped).
    fn pass(self: &Arc<Self>) {
        loop {
            let Some(next) = self.lock().leave() else {
                return;
            };
            let turn = Turn {
                turns: Some(self.clone()),
            };
            match next.send(turn) {
                Ok(()) => return,
                // Nobody to take it: defused (no recursion), and on to the next waiter.
                Err(mut unused) => unused.turns = None,
            }
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(turns) = self.turns.take() {
            turns.pass();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(lines: &mut Lines<&'static str>) -> Vec<&'static str> {
        std::iter::from_fn(|| lines.leave()).collect()
    }

    #[test]
    fn free_turns_are_taken_at_once_then_everyone_waits() {
        let mut lines = Lines::new(2);
        assert_eq!(lines.arrive("a", Lane::Routine, "a1"), Some("a1"));
        assert_eq!(lines.arrive("a", Lane::Routine, "a2"), Some("a2"));
        assert_eq!(lines.arrive("a", Lane::Routine, "a3"), None);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines.leave(), Some("a3"));
        // Two turns end with nobody waiting: both free again.
        assert_eq!(lines.leave(), None);
        assert_eq!(lines.leave(), None);
        assert_eq!(lines.arrive("b", Lane::Routine, "b1"), Some("b1"));
        assert_eq!(lines.arrive("b", Lane::Routine, "b2"), Some("b2"));
        assert_eq!(lines.arrive("b", Lane::Routine, "b3"), None);
    }

    #[test]
    fn each_lane_is_first_come_first_served() {
        // What kube-runtime's parked set did not do: the order of arrival is the order of
        // turns, so no secret waits behind ones that arrived after it.
        let mut lines = Lines::new(1);
        lines.arrive("a", Lane::Routine, "busy");
        for w in ["a1", "a2", "a3", "a4"] {
            assert_eq!(lines.arrive("a", Lane::Routine, w), None);
        }
        assert_eq!(drain(&mut lines), ["a1", "a2", "a3", "a4"]);
    }

    #[test]
    fn namespaces_take_turns_whatever_each_one_holds() {
        // One namespace with thousands waiting: a secret of another namespace is next but one.
        let mut lines = Lines::new(1);
        lines.arrive("big", Lane::Routine, "busy");
        for w in ["big1", "big2", "big3", "big4", "big5"] {
            lines.arrive("big", Lane::Routine, w);
        }
        lines.arrive("small", Lane::Routine, "small1");
        lines.arrive("other", Lane::Routine, "other1");
        assert_eq!(
            drain(&mut lines),
            ["big1", "small1", "other1", "big2", "big3", "big4", "big5"]
        );
        assert!(lines.is_empty());
    }

    #[test]
    fn a_new_or_changed_secret_goes_before_its_namespace_refreshes() {
        let mut lines = Lines::new(1);
        lines.arrive("a", Lane::Routine, "busy");
        lines.arrive("a", Lane::Routine, "refresh1");
        lines.arrive("a", Lane::Routine, "refresh2");
        lines.arrive("a", Lane::Urgent, "new1");
        lines.arrive("a", Lane::Urgent, "new2");
        assert_eq!(drain(&mut lines), ["new1", "new2", "refresh1", "refresh2"]);
    }

    #[test]
    fn a_namespace_that_empties_leaves_the_ring_and_rejoins_at_the_back() {
        let mut lines = Lines::new(1);
        lines.arrive("a", Lane::Routine, "busy");
        lines.arrive("a", Lane::Routine, "a1");
        lines.arrive("b", Lane::Routine, "b1");
        lines.arrive("b", Lane::Routine, "b2");
        assert_eq!(lines.leave(), Some("a1"));
        lines.arrive("a", Lane::Routine, "a2");
        assert_eq!(drain(&mut lines), ["b1", "a2", "b2"]);
    }

    #[tokio::test]
    async fn turns_are_handed_on_and_never_exceed_the_slots() {
        let turns = Turns::new(2);
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let (turns, running, most) = (turns.clone(), running.clone(), most.clone());
                tokio::spawn(async move {
                    let _turn = turns
                        .take(&format!("ns{}", i % 3), Lane::Routine)
                        .await
                        .unwrap();
                    let now = running.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    most.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(turns.waiting(), 0);
        // Both turns are free again.
        let (a, b) = (
            turns.take("x", Lane::Routine).await,
            turns.take("y", Lane::Routine).await,
        );
        assert!(a.is_some() && b.is_some());
    }

    #[tokio::test]
    async fn a_waiter_dropped_before_its_turn_loses_no_turn() {
        let turns = Turns::new(1);
        let first = turns.take("a", Lane::Routine).await.unwrap();
        // A reconcile dropped while it waits (the controller shutting down).
        let gone = tokio::spawn({
            let turns = turns.clone();
            async move { turns.take("a", Lane::Routine).await }
        });
        tokio::task::yield_now().await;
        gone.abort();
        let _ = gone.await;
        let next = tokio::spawn({
            let turns = turns.clone();
            async move { turns.take("b", Lane::Routine).await.is_some() }
        });
        tokio::task::yield_now().await;
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(5), next)
            .await
            .expect("the turn reached the live waiter")
            .unwrap()
            .then_some(())
            .expect("a turn");
    }

    #[tokio::test]
    async fn once_closed_no_waiter_runs_and_no_turn_is_handed_out() {
        let turns = Turns::new(1);
        let running = turns.take("a", Lane::Routine).await.unwrap();
        let waiters: Vec<_> = (0..5)
            .map(|_| {
                let turns = turns.clone();
                tokio::spawn(async move { turns.take("a", Lane::Urgent).await.is_some() })
            })
            .collect();
        tokio::task::yield_now().await;
        // Leadership lost: the waiters give up, the running reconcile finishes.
        turns.close();
        for w in waiters {
            assert!(!w.await.unwrap(), "a waiter ran after the close");
        }
        drop(running);
        assert!(turns.take("b", Lane::Routine).await.is_none());
    }
}
