//! A deadline that moves on every request without touching the timer wheel.
//!
//! A kept-alive connection gives each request head `server.header_read_timeout` from the moment
//! it starts waiting for it. A fresh `timeout_at` per request registers a timer entry and
//! removes it again (a lock, a wheel insert and a removal: some hundreds of instructions per
//! request) for a timer that almost never fires. A [`LazyDeadline`] keeps one timer per
//! connection; moving the deadline later only writes a field. When the timer fires before the
//! deadline it is pushed to the deadline then, so it fires at most once per timeout period
//! when nothing is late (HAProxy and nginx keep their timers the same way).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

pub(crate) struct LazyDeadline {
    timer: Pin<Box<Sleep>>,
    /// When the timer is set to fire; the real deadline is `deadline`, never earlier.
    timer_at: Instant,
    deadline: Instant,
}

impl LazyDeadline {
    pub fn new(deadline: Instant) -> Self {
        LazyDeadline {
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            timer_at: deadline,
            deadline,
        }
    }

    /// Sets the deadline; a later one costs nothing now, an earlier one resets the timer.
    pub fn set(&mut self, deadline: Instant) {
        self.deadline = deadline;
        if deadline < self.timer_at {
            self.timer.as_mut().reset(deadline);
            self.timer_at = deadline;
        }
    }

    /// Ready once the deadline has passed.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if self.deadline <= self.timer_at {
                return Poll::Ready(());
            }
            // Fired for an earlier deadline that has since moved: wait for the new one.
            self.timer.as_mut().reset(self.deadline);
            self.timer_at = self.deadline;
        }
    }

    /// Resolves once the deadline has passed.
    pub async fn expired(&mut self) {
        std::future::poll_fn(|cx| self.poll_expired(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn fires_at_the_latest_deadline_set() {
        let start = Instant::now();
        let mut d = LazyDeadline::new(start + Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(6)).await;
        d.set(Instant::now() + Duration::from_secs(10)); // 16 s
        d.expired().await;
        assert_eq!(Instant::now() - start, Duration::from_secs(16));
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_is_kept() {
        let start = Instant::now();
        let mut d = LazyDeadline::new(start + Duration::from_secs(10));
        d.set(start + Duration::from_secs(3));
        d.expired().await;
        assert_eq!(Instant::now() - start, Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn not_expired_before_the_deadline() {
        let start = Instant::now();
        let mut d = LazyDeadline::new(start + Duration::from_secs(10));
        d.set(start + Duration::from_secs(30));
        let r = tokio::time::timeout(Duration::from_secs(29), d.expired()).await;
        assert!(r.is_err(), "expired early");
        d.expired().await;
        assert_eq!(Instant::now() - start, Duration::from_secs(30));
    }
}
