//! Watching for shutdown without paying for it on every wake-up.
//!
//! A connection or a tunnel waits on its I/O and on the guard's stop token at once. Waiting on
//! the token the usual way (`select!` with `token.cancelled()`) builds, registers and drops a
//! waiter in the token's list on every request, or polls it under its lock on every message:
//! a few hundred instructions per request on the hot path, for an event that comes once.
//! A [`ShutdownWatch`] registers its waiter once and keeps it, and the waker it registers is
//! an alarm: when the token is cancelled, the alarm sets a flag of the watch's own and then
//! wakes the task. On every other wake-up that flag alone (one atomic load, no lock) says
//! whether shutdown is what happened. The waiter is polled again only if the task's waker
//! changes (the future moved to another task).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// One task's view of the stop token.
pub(crate) struct ShutdownWatch {
    token: CancellationToken,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Set by the alarm before it wakes the task: the token was cancelled.
    rang: Arc<AtomicBool>,
    /// The task's waker the registered alarm wakes, once registered.
    waker: Option<Waker>,
}

/// The waker registered in the token's list: the token calls it once, on cancellation.
struct Alarm {
    rang: Arc<AtomicBool>,
    task: Waker,
}

impl Wake for Alarm {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Before the wake: the woken task must see the flag.
        self.rang.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl ShutdownWatch {
    pub fn new(token: CancellationToken) -> Self {
        ShutdownWatch {
            cancelled: Box::pin(token.clone().cancelled_owned()),
            token,
            rang: Arc::new(AtomicBool::new(false)),
            waker: None,
        }
    }

    /// Whether shutdown has been asked for; if not, the task is woken when it is.
    pub fn poll_requested(&mut self, cx: &mut Context<'_>) -> bool {
        match &self.waker {
            Some(w) if w.will_wake(cx.waker()) => self.rang.load(Ordering::Acquire),
            _ => {
                let alarm = Waker::from(Arc::new(Alarm {
                    rang: self.rang.clone(),
                    task: cx.waker().clone(),
                }));
                if self
                    .cancelled
                    .as_mut()
                    .poll(&mut Context::from_waker(&alarm))
                    .is_ready()
                {
                    self.rang.store(true, Ordering::Release);
                    return true;
                }
                self.waker = Some(cx.waker().clone());
                false
            }
        }
    }

    /// Resolves when shutdown is asked for.
    pub async fn requested(&mut self) {
        std::future::poll_fn(|cx| {
            if self.poll_requested(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Whether shutdown has been asked for, without registering anything.
    pub fn is_requested(&self) -> bool {
        if self.waker.is_some() {
            // Registered: the alarm has rung if the token was cancelled.
            self.rang.load(Ordering::Acquire)
        } else {
            self.token.is_cancelled()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_watch_polled_many_times_still_sees_the_stop() {
        let token = CancellationToken::new();
        let mut watch = ShutdownWatch::new(token.clone());
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(1);
        let task = tokio::spawn(async move {
            let mut seen = 0;
            loop {
                tokio::select! {
                    Some(_) = rx.recv() => seen += 1,
                    _ = watch.requested() => return seen,
                }
            }
        });
        for i in 0..50 {
            tx.send(i).await.unwrap();
        }
        // Let the task take the last message and wait again on both.
        tokio::time::sleep(Duration::from_millis(20)).await;
        token.cancel();
        let seen = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the stop wakes a task whose waiter was registered long before")
            .unwrap();
        assert_eq!(seen, 50);
    }

    #[tokio::test]
    async fn a_registered_watch_hears_the_stop_without_being_polled() {
        let token = CancellationToken::new();
        let mut watch = ShutdownWatch::new(token.clone());
        // Registered by a poll that finds nothing yet.
        let pending = tokio::time::timeout(Duration::from_millis(10), watch.requested()).await;
        assert!(pending.is_err());
        assert!(!watch.is_requested());
        token.cancel();
        assert!(watch.is_requested(), "the alarm rang inside cancel()");
        tokio::time::timeout(Duration::from_secs(1), watch.requested())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_watch_made_after_the_stop_sees_it_at_once() {
        let token = CancellationToken::new();
        token.cancel();
        let mut watch = ShutdownWatch::new(token);
        assert!(watch.is_requested());
        tokio::time::timeout(Duration::from_secs(1), watch.requested())
            .await
            .unwrap();
    }
}
