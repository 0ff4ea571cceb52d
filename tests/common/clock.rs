//! Tokio time that moves only when the test moves it, while real sockets carry the bytes.
//!
//! `#[tokio::test(start_paused = true)]` alone does not work with real sockets: when every
//! task waits, tokio jumps the paused clock to the next timer, and a task waiting for a
//! loopback socket looks exactly like that. Bytes in the kernel (delivered a moment later,
//! e.g. when the network softirq is deferred on a loaded machine) would let the guard's timers
//! (the grace period, a response timeout) fire "early", and the test would flake.
//!
//! [`ManualClock::hold`] keeps a blocking task running for as long as it lives: tokio does not
//! auto-advance a paused clock while a `spawn_blocking` task runs (tokio's test-util
//! documents this). The clock then moves only by [`ManualClock::advance`], so the order of
//! events is the test's: a timer of the guard or the simulator fires exactly when the test
//! has moved the clock past it, never while bytes are on their way. Everything the test
//! waits for meanwhile (bytes, a task) is waited for in real time, bounded by
//! [`real_timeout`], [`real_sleep`] and [`real_poll_for`]: `tokio::time::sleep` and
//! `tokio::time::timeout` would never end while the clock is held.
//!
//! Only for tests on a paused current-thread runtime (`start_paused = true`); the guard, the
//! simulator and the clients must run on that runtime (they do when the test starts them).

use std::future::Future;
use std::time::Duration;

/// Virtual time that moves only by [`ManualClock::advance`] (see the module doc).
pub struct ManualClock {
    release: Option<std::sync::mpsc::Sender<()>>,
    start: tokio::time::Instant,
}

impl ManualClock {
    /// Holds the paused clock still (on a runtime whose clock is not paused, the first
    /// [`ManualClock::advance`] panics: "time is not frozen").
    pub fn hold() -> ManualClock {
        let start = tokio::time::Instant::now();
        let (release, held) = std::sync::mpsc::channel::<()>();
        tokio::task::spawn_blocking(move || {
            // Returns when the sender is dropped (the clock is dropped, or the test panics).
            let _ = held.recv();
        });
        ManualClock {
            release: Some(release),
            start,
        }
    }

    /// Moves the clock by `d`; the timers due by then fire.
    pub async fn advance(&self, d: Duration) {
        tokio::time::advance(d).await;
        // Let what the timers woke run before the test looks.
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
    }

    /// Moves the clock to `at` after the clock was held (no-op when it is there already).
    pub async fn advance_to(&self, at: Duration) {
        let now = self.elapsed();
        if at > now {
            self.advance(at - now).await;
        }
    }

    /// Virtual time since [`ManualClock::hold`].
    pub fn elapsed(&self) -> Duration {
        tokio::time::Instant::now() - self.start
    }
}

impl Drop for ManualClock {
    fn drop(&mut self) {
        // The blocking task returns, and tokio may auto-advance again.
        self.release.take();
    }
}

/// Waits `d` of real time, whatever the tokio clock does (a blocking thread waits). Dropped
/// early (a [`real_timeout`] whose future won), the thread ends at once: the runtime waits for
/// its blocking threads when the test ends.
pub async fn real_sleep(d: Duration) {
    let (wake, waiting) = std::sync::mpsc::channel::<()>();
    let sleeper = tokio::task::spawn_blocking(move || {
        let _ = waiting.recv_timeout(d);
    });
    sleeper.await.expect("sleeping thread");
    drop(wake);
}

/// `f`, or `None` once `d` of real time has passed.
pub async fn real_timeout<F: Future>(d: Duration, f: F) -> Option<F::Output> {
    tokio::select! {
        v = f => Some(v),
        _ = real_sleep(d) => None,
    }
}

/// Waits (in real time, up to `timeout`) until `f` has something, and returns it; fails the
/// test naming `what` otherwise.
pub async fn real_poll_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if std::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} (real time) waiting for: {what}");
        }
        real_sleep(Duration::from_millis(10)).await;
    }
}

/// [`real_poll_for`] with an asynchronous look (a connect, a request).
pub async fn real_poll_async<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if std::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} (real time) waiting for: {what}");
        }
        real_sleep(Duration::from_millis(10)).await;
    }
}
