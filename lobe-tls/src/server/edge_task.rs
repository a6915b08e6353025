//! The edge's task, watched: it serves until `serve` asks it to stop, so a panic, or an
//! end it came to on its own, is a failure that ends `serve` with its cause (and a
//! non-zero exit status) instead of leaving a process that listens to nobody.

use std::future::Future;
use std::pin::Pin;

use crate::error::{Error, Result};
use tokio::sync::oneshot;
use tokio::task::{JoinError, JoinHandle};

/// Completes when the edge is asked to stop (what [`crate::edge::Edge::run`] waits on).
pub(super) type Stopped = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A running edge task.
pub(super) struct EdgeTask {
    task: JoinHandle<()>,
    stop: oneshot::Sender<()>,
    ended: Option<oneshot::Receiver<()>>,
}

impl EdgeTask {
    /// Spawns `serve(stopped)`, where `stopped` completes when [`EdgeTask::stop`] runs.
    pub(super) fn spawn<F>(serve: impl FnOnce(Stopped) -> F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel::<()>();
        let (ended_tx, ended) = oneshot::channel::<()>();
        let serving = serve(Box::pin(async move {
            let _ = stopped.await;
        }));
        let task = tokio::spawn(async move {
            // Dropped when the task ends, by returning or by a panic: wakes `ended`.
            let _ended = ended_tx;
            serving.await;
        });
        EdgeTask {
            task,
            stop,
            ended: Some(ended),
        }
    }

    /// A future that completes when the task has ended (asked to or not); the first
    /// call takes it, later ones never complete.
    pub(super) fn ended(&mut self) -> impl Future<Output = ()> + Send + 'static {
        let ended = self.ended.take();
        async move {
            match ended {
                Some(ended) => {
                    let _ = ended.await;
                }
                None => std::future::pending().await,
            }
        }
    }

    /// Asks the task to stop and waits for it to drain. An error (one line, with the
    /// cause) when it panicked, or had stopped before it was asked to.
    pub(super) async fn stop(self) -> Result<()> {
        // The task holds the receiver while it runs: a failed send means it had ended.
        let asked = self.stop.send(()).is_ok();
        match self.task.await {
            Err(e) => Err(Error::config(format!("the edge failed: {}", cause_of(e)))),
            Ok(()) if !asked => Err(Error::config(
                "the edge stopped serving before it was asked to",
            )),
            Ok(()) => Ok(()),
        }
    }
}

/// A panic's message (or the join error), on one line.
fn cause_of(error: JoinError) -> String {
    let cause = match error.try_into_panic() {
        Ok(panic) => match panic.downcast::<String>() {
            Ok(message) => format!("panicked: {message}"),
            Err(panic) => match panic.downcast::<&'static str>() {
                Ok(message) => format!("panicked: {message}"),
                Err(_) => "panicked".to_owned(),
            },
        },
        Err(error) => error.to_string(),
    };
    cause.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_panic_of_the_edge_ends_serve_with_its_cause() {
        let mut task = EdgeTask::spawn(|_stopped| async {
            tokio::task::yield_now().await;
            panic!("accept loop:\nboom");
        });
        // Wakes whoever waits on signals, at once.
        tokio::time::timeout(Duration::from_secs(5), task.ended())
            .await
            .unwrap();
        let Err(e) = task.stop().await else {
            panic!("a panic was a success");
        };
        assert_eq!(
            e.to_string(),
            "the edge failed: panicked: accept loop: boom"
        );
    }

    #[tokio::test]
    async fn an_edge_that_stops_on_its_own_is_a_failure() {
        let mut task = EdgeTask::spawn(|_stopped| async {});
        tokio::time::timeout(Duration::from_secs(5), task.ended())
            .await
            .unwrap();
        let e = task.stop().await.err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("the edge stopped serving before it was asked to")
        );
    }

    #[tokio::test]
    async fn an_edge_asked_to_stop_is_a_success() {
        let (drained_tx, drained) = oneshot::channel();
        let mut task = EdgeTask::spawn(|stopped| async move {
            stopped.await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = drained_tx.send(());
        });
        let ended = task.ended();
        assert!(
            tokio::time::timeout(Duration::from_millis(100), ended)
                .await
                .is_err(),
            "ended while serving"
        );
        assert!(task.stop().await.is_ok());
        assert!(drained.await.is_ok(), "stop did not wait for the drain");
    }
}
