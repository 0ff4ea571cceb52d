//! The plain-TCP WebSocket relay: one thread with its own epoll loop (mio) that copies the
//! bytes of every tunnel whose two sides are plain TCP sockets.
//!
//! Why not a tokio task per tunnel ([`super::tunnel`])? An engine WebSocket carries many small
//! messages, and on tokio each one costs a reactor turn, a task wake-up and scheduling, a
//! readiness check on both directions and a waker registered again under a lock: measured with
//! `benches/cost.sh`, 3,300 instructions per message relayed each way, 2.4 times nginx's. This
//! loop does what nginx does: one readiness event, one `recv` into a buffer the thread owns,
//! one `send` to the other side. Tunnels over TLS stay on tokio: their bytes need the TLS
//! state, which lives in the task.
//!
//! The task that opened a tunnel stays parked until the relay reports how the tunnel ended; it
//! tells the relay to close the tunnel on shutdown, and it keeps the tunnel counted among the
//! proxy's open tunnels. Idle and half-close deadlines are checked once a second, and only while
//! some tunnel has one: nothing reads the clock on the copy path.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::tunnel::{Ending, Observer, Transferred, FIN_TIMEOUT};

/// The relay a proxy hands its plain tunnels to; its thread starts with the first tunnel and
/// stops when the relay is dropped (closing what is still open).
pub struct Relay {
    started: OnceLock<Option<Arc<Shared>>>,
    next_key: AtomicU64,
    fin_timeout: Duration,
}

/// What the opening tasks and the relay thread share.
struct Shared {
    waker: Waker,
    /// `None` once the thread has ended (it cannot take commands any more).
    inbox: Mutex<Option<Vec<Command>>>,
}

enum Command {
    Open(Box<Opening>),
    /// Shutdown: end this tunnel now.
    Close(u64),
    /// The relay was dropped.
    Stop,
}

struct Opening {
    key: u64,
    client: TcpStream,
    upstream: TcpStream,
    observer: Option<Observer>,
    idle: Option<Duration>,
    done: oneshot::Sender<(Ending, Transferred)>,
}

impl Default for Relay {
    fn default() -> Self {
        Relay::new(FIN_TIMEOUT)
    }
}

impl Relay {
    /// A relay whose half-closed tunnels end after `fin_timeout` (tests shorten it).
    pub fn new(fin_timeout: Duration) -> Relay {
        Relay {
            started: OnceLock::new(),
            next_key: AtomicU64::new(0),
            fin_timeout,
        }
    }

    fn shared(&self) -> Option<&Arc<Shared>> {
        self.started
            .get_or_init(|| match start(self.fin_timeout) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(
                        "WebSocket relay thread not started ({e}): tunnels stay on tokio"
                    );
                    None
                }
            })
            .as_ref()
    }

    /// Relays between two plain sockets until both directions are done, the idle timeout
    /// passes, or `stop` is cancelled. Gives the sockets back if the relay cannot take them
    /// (its thread could not start), so that the caller can copy them itself.
    pub async fn run(
        &self,
        client: tokio::net::TcpStream,
        upstream: tokio::net::TcpStream,
        idle: Option<Duration>,
        stop: CancellationToken,
        observer: Option<Observer>,
    ) -> Result<(Ending, Transferred), Unrelayed> {
        let Some(shared) = self.shared().filter(|s| s.alive()) else {
            return Err(Unrelayed {
                client,
                upstream,
                observer,
            });
        };
        // Out of tokio's reactor and into the relay's; both stay non-blocking.
        let (Ok(client), Ok(upstream)) = (client.into_std(), upstream.into_std()) else {
            return Ok((Ending::Error, Transferred::default()));
        };
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let (done, mut ended) = oneshot::channel();
        shared.send(Command::Open(Box::new(Opening {
            key,
            client: TcpStream::from_std(client),
            upstream: TcpStream::from_std(upstream),
            observer,
            idle,
            done,
        })));
        // Dropped before the end (its runtime going away), this task takes the tunnel with it.
        let mut owner = CloseOnDrop {
            shared,
            key: Some(key),
        };
        let result = tokio::select! {
            r = &mut ended => r,
            _ = stop.cancelled() => {
                shared.send(Command::Close(key));
                ended.await
            }
        };
        owner.key = None;
        // The relay went away with the tunnel (it was dropped): that is a shutdown.
        Ok(result.unwrap_or((Ending::Shutdown, Transferred::default())))
    }
}

/// Closes a tunnel whose task is dropped before the tunnel ends.
struct CloseOnDrop<'a> {
    shared: &'a Shared,
    key: Option<u64>,
}

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.shared.send(Command::Close(key));
        }
    }
}

/// Sockets the relay did not take.
pub struct Unrelayed {
    pub client: tokio::net::TcpStream,
    pub upstream: tokio::net::TcpStream,
    pub observer: Option<Observer>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(Some(shared)) = self.started.get() {
            shared.send(Command::Stop);
        }
    }
}

impl Shared {
    fn inbox(&self) -> std::sync::MutexGuard<'_, Option<Vec<Command>>> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn alive(&self) -> bool {
        self.inbox().is_some()
    }

    /// A command for the thread. If the thread has ended, the command is dropped: an opening
    /// then drops its sockets and its `done` sender, and its task sees the end at once.
    fn send(&self, c: Command) {
        if let Some(inbox) = &mut *self.inbox() {
            inbox.push(c);
        }
        // A failed wake-up would leave the command waiting for the next event or sweep; the
        // eventfd write does not fail while the loop's poll lives.
        let _ = self.waker.wake();
    }
}

const WAKE: Token = Token(usize::MAX);
/// How often deadlines are checked while some tunnel has one.
const SWEEP: Duration = Duration::from_secs(1);
const BUF: usize = 16 * 1024;

fn start(fin_timeout: Duration) -> io::Result<Arc<Shared>> {
    let poll = Poll::new()?;
    let shared = Arc::new(Shared {
        waker: Waker::new(poll.registry(), WAKE)?,
        inbox: Mutex::new(Some(Vec::new())),
    });
    let inbox = shared.clone();
    std::thread::Builder::new()
        .name("qsguard-ws-relay".into())
        .spawn(move || Loop::new(poll, inbox, fin_timeout).run())?;
    Ok(shared)
}

/// One direction of a tunnel: from side `d` to side `1 - d` (0 is the client, 1 is Qlik).
#[derive(Default)]
struct Direction {
    /// What the writer could not take yet (allocated only then); nothing more is read until
    /// it has gone.
    pending: Vec<u8>,
    written: usize,
    /// The reader sent its FIN (or failed).
    read_done: bool,
    /// The FIN was passed on: this direction is finished.
    done: bool,
    bytes: u64,
}

/// What the last readiness events said of one socket (edge-triggered: readiness holds until a
/// read or write says otherwise).
#[derive(Default, Clone, Copy)]
struct Ready {
    readable: bool,
    /// The peer closed its half: read to the end even after a short read.
    read_closed: bool,
    writable: bool,
}

struct Tunnel {
    key: u64,
    sides: [TcpStream; 2],
    ready: [Ready; 2],
    dirs: [Direction; 2],
    observer: Option<Observer>,
    idle: Option<Duration>,
    /// Bytes moved since the last sweep.
    moved: bool,
    quiet_since: Option<Instant>,
    fin_at: Option<Instant>,
    /// How long a half-closed tunnel waits for the other side's FIN.
    fin_after: Duration,
    done: Option<oneshot::Sender<(Ending, Transferred)>>,
}

impl Tunnel {
    fn timed(&self) -> bool {
        self.idle.is_some() || self.fin_at.is_some()
    }

    /// Moves what can be moved in direction `d`; `Err` when a socket failed.
    fn pump(&mut self, d: usize, buf: &mut [u8]) -> io::Result<()> {
        let (src, dst) = (d, 1 - d);
        loop {
            let dir = &mut self.dirs[d];
            if dir.done {
                return Ok(());
            }
            if dir.written < dir.pending.len() {
                if !self.ready[dst].writable {
                    return Ok(());
                }
                let left = &dir.pending[dir.written..];
                let n = send_some(&self.sides[dst], left, &mut self.ready[dst].writable)?;
                dir.written += n;
                self.moved |= n > 0;
                if dir.written < dir.pending.len() {
                    return Ok(());
                }
            }
            if !dir.pending.is_empty() {
                dir.pending = Vec::new();
                dir.written = 0;
            }
            if dir.read_done {
                // Pass the FIN on; the other direction may go on.
                let _ = self.sides[dst].shutdown(Shutdown::Write);
                dir.done = true;
                return Ok(());
            }
            if !self.ready[src].readable {
                return Ok(());
            }
            let n = match (&self.sides[src]).read(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.ready[src].readable = false;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                self.dirs[d].read_done = true;
                continue;
            }
            // A short read took all there was: the next byte brings a new edge. Unless the
            // peer has closed: its FIN may be waiting behind the data, with no edge to come.
            if n < buf.len() && !self.ready[src].read_closed {
                self.ready[src].readable = false;
            }
            let data = &buf[..n];
            self.moved = true;
            self.dirs[d].bytes += n as u64;
            if d == 1 {
                if let Some(o) = &mut self.observer {
                    o(data);
                }
            }
            let off = send_some(&self.sides[dst], data, &mut self.ready[dst].writable)?;
            if off < n {
                let dir = &mut self.dirs[d];
                dir.pending = data[off..].to_vec();
                dir.written = 0;
                return Ok(());
            }
        }
    }

    /// Handles an event on side `s`; `Some` when the tunnel has ended.
    fn on_event(&mut self, s: usize, e: &mio::event::Event, buf: &mut [u8]) -> Option<Ending> {
        let r = &mut self.ready[s];
        // An error shows itself on the next read or write.
        r.readable |= e.is_readable() || e.is_read_closed() || e.is_error();
        r.read_closed |= e.is_read_closed() || e.is_error();
        r.writable |= e.is_writable() || e.is_write_closed() || e.is_error();
        // Data from this side, and anything waiting to be written to it.
        if self.pump(s, buf).is_err() || self.pump(1 - s, buf).is_err() {
            return Some(Ending::Error);
        }
        match (self.dirs[0].done, self.dirs[1].done) {
            (true, true) => Some(Ending::Closed),
            (false, false) => None,
            _ => {
                if self.fin_at.is_none() {
                    self.fin_at = Some(Instant::now() + self.fin_after);
                }
                None
            }
        }
    }

    fn finish(mut self, registry: &Registry, ending: Ending) {
        for s in &mut self.sides {
            let _ = registry.deregister(s);
        }
        let moved = Transferred {
            to_upstream: self.dirs[0].bytes,
            to_client: self.dirs[1].bytes,
        };
        if let Some(done) = self.done.take() {
            let _ = done.send((ending, moved));
        }
        // The sockets close as they drop.
    }
}

/// Writes as much of `data` to `to` as it takes now, and says how much that was; a socket
/// that takes no more is marked not writable until its next edge.
fn send_some(to: &TcpStream, data: &[u8], writable: &mut bool) -> io::Result<usize> {
    let mut off = 0;
    while off < data.len() {
        match (&*to).write(&data[off..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                *writable = false;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(off)
}

/// The relay thread's state.
struct Loop {
    poll: Poll,
    shared: Arc<Shared>,
    tunnels: Vec<Option<Tunnel>>,
    free: Vec<usize>,
    slots: HashMap<u64, usize>,
    /// Tunnels with an idle timeout or a half-close deadline.
    timed: usize,
    next_sweep: Instant,
    fin_timeout: Duration,
}

/// However the relay thread ends (a panic in an engine observer included), no command waits
/// for it afterwards, and new tunnels stay on tokio. The relay is marked ended here, before
/// the fields (its tunnels) are dropped: a task that sees its tunnel end and opens another at
/// once must find the relay ended, not hand the new tunnel to a thread that is going away.
impl Drop for Loop {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(
                "WebSocket relay thread failed: its tunnels are closed, new ones stay on tokio"
            );
        }
        let left = self.shared.inbox().take();
        drop(left);
    }
}

impl Loop {
    fn new(poll: Poll, shared: Arc<Shared>, fin_timeout: Duration) -> Loop {
        Loop {
            poll,
            shared,
            tunnels: Vec::new(),
            free: Vec::new(),
            slots: HashMap::new(),
            timed: 0,
            next_sweep: Instant::now(),
            fin_timeout,
        }
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        let mut buf = vec![0u8; BUF].into_boxed_slice();
        loop {
            let timeout = (self.timed > 0).then_some(SWEEP);
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!("WebSocket relay stopped: {e}");
                self.close_all(Ending::Error);
                return;
            }
            let mut commands = false;
            for e in events.iter() {
                if e.token() == WAKE {
                    commands = true;
                    continue;
                }
                let (slot, side) = (e.token().0 / 2, e.token().0 % 2);
                // Closed earlier in this batch.
                let Some(Some(t)) = self.tunnels.get_mut(slot) else {
                    continue;
                };
                let was_timed = t.timed();
                let ended = t.on_event(side, e, &mut buf);
                if !was_timed && t.timed() {
                    self.timed += 1;
                }
                if let Some(ending) = ended {
                    self.finish(slot, ending);
                }
            }
            if commands && !self.take_commands() {
                return;
            }
            if self.timed > 0 {
                self.sweep();
            }
            self.shrink();
        }
    }

    /// Runs what the tasks asked for; `false` once the relay is to stop.
    fn take_commands(&mut self) -> bool {
        let commands = self.shared.inbox().as_mut().map(std::mem::take);
        for c in commands.into_iter().flatten() {
            match c {
                Command::Open(o) => self.open(*o),
                Command::Close(key) => {
                    if let Some(&slot) = self.slots.get(&key) {
                        self.finish(slot, Ending::Shutdown);
                    }
                }
                Command::Stop => {
                    self.close_all(Ending::Shutdown);
                    return false;
                }
            }
        }
        true
    }

    fn open(&mut self, o: Opening) {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.tunnels.push(None);
            self.tunnels.len() - 1
        });
        let mut t = Tunnel {
            key: o.key,
            sides: [o.client, o.upstream],
            ready: [Ready::default(); 2],
            dirs: Default::default(),
            observer: o.observer,
            idle: o.idle,
            moved: false,
            quiet_since: o.idle.map(|_| Instant::now()),
            fin_at: None,
            fin_after: self.fin_timeout,
            done: Some(o.done),
        };
        // Both interests once, edge-triggered, for the tunnel's life (as nginx does): a socket
        // that is readable already reports it on the first poll.
        let registry = self.poll.registry();
        for (side, s) in t.sides.iter_mut().enumerate() {
            let token = Token(slot * 2 + side);
            if let Err(e) = registry.register(s, token, Interest::READABLE | Interest::WRITABLE) {
                tracing::debug!("WebSocket relay could not watch a socket: {e}");
                t.finish(registry, Ending::Error);
                self.free.push(slot);
                return;
            }
        }
        if t.timed() {
            self.timed += 1;
        }
        self.slots.insert(t.key, slot);
        self.tunnels[slot] = Some(t);
    }

    fn finish(&mut self, slot: usize, ending: Ending) {
        if let Some(t) = self.tunnels[slot].take() {
            if t.timed() {
                self.timed -= 1;
            }
            self.slots.remove(&t.key);
            t.finish(self.poll.registry(), ending);
            self.free.push(slot);
        }
    }

    /// Gives the memory of a burst of tunnels back once they are all gone.
    fn shrink(&mut self) {
        if self.slots.is_empty() && self.tunnels.capacity() > 64 {
            self.tunnels = Vec::new();
            self.free = Vec::new();
            self.slots = HashMap::new();
        }
    }

    fn close_all(&mut self, ending: Ending) {
        for slot in 0..self.tunnels.len() {
            self.finish(slot, ending);
        }
    }

    /// Ends the tunnels past their idle or half-close deadline.
    fn sweep(&mut self) {
        let now = Instant::now();
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP;
        for slot in 0..self.tunnels.len() {
            let Some(t) = &mut self.tunnels[slot] else {
                continue;
            };
            let ending = if t.fin_at.is_some_and(|at| now >= at) {
                Some(Ending::Closed)
            } else if let (Some(idle), Some(since)) = (t.idle, t.quiet_since) {
                if std::mem::take(&mut t.moved) {
                    t.quiet_since = Some(now);
                    None
                } else {
                    (now.duration_since(since) >= idle).then_some(Ending::IdleTimeout)
                }
            } else {
                None
            };
            if let Some(ending) = ending {
                self.finish(slot, ending);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream as Tcp};

    /// Two connected loopback sockets: (the outside end, the end the relay takes).
    async fn socket_pair() -> (Tcp, Tcp) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let outside = Tcp::connect(l.local_addr().unwrap()).await.unwrap();
        let (inside, _) = l.accept().await.unwrap();
        (outside, inside)
    }

    /// A tunnel on `relay`: the browser's end, Qlik's end, and the relaying task.
    async fn tunnel(
        relay: &Arc<Relay>,
        idle: Option<Duration>,
        stop: CancellationToken,
        observer: Option<Observer>,
    ) -> (Tcp, Tcp, tokio::task::JoinHandle<(Ending, Transferred)>) {
        let (browser, client) = socket_pair().await;
        let (qlik, upstream) = socket_pair().await;
        let relay = relay.clone();
        let task = tokio::spawn(async move {
            match relay.run(client, upstream, idle, stop, observer).await {
                Ok(r) => r,
                Err(_) => panic!("the relay thread did not start"),
            }
        });
        (browser, qlik, task)
    }

    async fn ended(task: tokio::task::JoinHandle<(Ending, Transferred)>) -> (Ending, Transferred) {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the tunnel ends")
            .unwrap()
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_unchanged_under_backpressure_and_close_propagates() {
        let relay = Arc::new(Relay::default());
        let (mut browser, mut qlik, task) =
            tunnel(&relay, None, CancellationToken::new(), None).await;
        // More than both socket buffers hold: the relay must wait for a slow reader.
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            browser.write_all(&sent).await.unwrap();
            browser.shutdown().await.unwrap();
            let mut back = Vec::new();
            browser.read_to_end(&mut back).await.unwrap();
            back
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut got = Vec::new();
        let mut chunk = [0u8; 1000];
        loop {
            let n = qlik.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(got == big, "the bytes arrive unchanged and in order");
        qlik.write_all(b"\x81\x02ok").await.unwrap();
        qlik.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"\x81\x02ok");
        let (ending, moved) = ended(task).await;
        assert_eq!(ending, Ending::Closed);
        assert_eq!((moved.to_upstream, moved.to_client), (3_000_000, 4));
    }

    #[tokio::test]
    async fn bytes_sent_before_the_handover_and_data_followed_by_a_fin_all_arrive() {
        let relay = Arc::new(Relay::default());
        let (browser, client) = socket_pair().await;
        let (mut qlik, upstream) = socket_pair().await;
        let mut browser = browser;
        // Waiting in the socket before the relay watches it: no new edge will come for it.
        browser.write_all(b"early").await.unwrap();
        qlik.write_all(b"hello").await.unwrap();
        qlik.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = relay.clone();
        let task = tokio::spawn(async move {
            r.run(client, upstream, None, CancellationToken::new(), None)
                .await
                .ok()
                .unwrap()
        });
        let mut got = [0u8; 5];
        qlik.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"early");
        let mut back = Vec::new();
        browser.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"hello", "the data, then Qlik's FIN");
        browser.shutdown().await.unwrap();
        assert_eq!(qlik.read(&mut got).await.unwrap(), 0);
        assert_eq!(ended(task).await.0, Ending::Closed);
    }

    #[tokio::test]
    async fn the_observer_sees_what_qlik_sends_and_nothing_else() {
        let relay = Arc::new(Relay::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let observer: Observer = Box::new(move |b: &[u8]| s.lock().unwrap().extend_from_slice(b));
        let (mut browser, mut qlik, task) =
            tunnel(&relay, None, CancellationToken::new(), Some(observer)).await;
        browser.write_all(b"from the browser").await.unwrap();
        let mut got = [0u8; 16];
        qlik.read_exact(&mut got).await.unwrap();
        qlik.write_all(b"from qlik").await.unwrap();
        let mut got = [0u8; 9];
        browser.read_exact(&mut got).await.unwrap();
        assert_eq!(&*seen.lock().unwrap(), b"from qlik");
        drop((browser, qlik));
        ended(task).await;
    }

    #[tokio::test]
    async fn shutdown_closes_the_tunnel_and_both_sockets() {
        let relay = Arc::new(Relay::default());
        let stop = CancellationToken::new();
        let (mut browser, mut qlik, task) = tunnel(&relay, None, stop.clone(), None).await;
        browser.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        qlik.read_exact(&mut got).await.unwrap();
        stop.cancel();
        let (ending, moved) = ended(task).await;
        assert_eq!(ending, Ending::Shutdown);
        assert_eq!(moved.to_upstream, 4);
        assert_eq!(
            browser.read(&mut got).await.unwrap(),
            0,
            "the browser's socket closed"
        );
        assert_eq!(
            qlik.read(&mut got).await.unwrap(),
            0,
            "Qlik's socket closed"
        );
    }

    #[tokio::test]
    async fn a_dropped_task_takes_its_tunnel_with_it() {
        let relay = Arc::new(Relay::default());
        let (mut browser, _qlik, task) = tunnel(&relay, None, CancellationToken::new(), None).await;
        let (mut other, mut other_qlik, other_task) =
            tunnel(&relay, None, CancellationToken::new(), None).await;
        browser.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        task.abort();
        let mut b = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(10), browser.read(&mut b)).await;
        assert_eq!(closed.expect("closed").unwrap(), 0);
        // The other tunnel goes on.
        other.write_all(b"y").await.unwrap();
        other_qlik.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"y");
        drop((other, other_qlik));
        assert_eq!(ended(other_task).await.0, Ending::Closed);
    }

    #[tokio::test]
    async fn a_half_closed_tunnel_ends_after_the_fin_timeout() {
        let relay = Arc::new(Relay::new(Duration::from_millis(300)));
        let (mut browser, _qlik, task) = tunnel(&relay, None, CancellationToken::new(), None).await;
        // The browser closes its half; Qlik never does.
        browser.shutdown().await.unwrap();
        let (ending, _) = ended(task).await;
        assert_eq!(ending, Ending::Closed);
    }

    #[tokio::test]
    async fn the_idle_timeout_ends_a_quiet_tunnel_and_traffic_keeps_one_open() {
        let relay = Arc::new(Relay::default());
        let idle = Some(Duration::from_millis(1500));
        let (mut busy, mut busy_qlik, busy_task) =
            tunnel(&relay, idle, CancellationToken::new(), None).await;
        let (_quiet, _quiet_qlik, quiet_task) =
            tunnel(&relay, idle, CancellationToken::new(), None).await;
        let mut b = [0u8; 1];
        for _ in 0..8 {
            busy.write_all(b"m").await.unwrap();
            busy_qlik.read_exact(&mut b).await.unwrap();
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        assert!(quiet_task.is_finished(), "quiet for over 3 s");
        assert_eq!(ended(quiet_task).await.0, Ending::IdleTimeout);
        assert!(
            !busy_task.is_finished(),
            "a message every 0.4 s keeps it open"
        );
        assert_eq!(ended(busy_task).await.0, Ending::IdleTimeout);
    }

    #[tokio::test]
    async fn a_reset_ends_the_tunnel_with_an_error_and_the_relay_serves_on() {
        let relay = Arc::new(Relay::default());
        let (browser, _qlik, task) = tunnel(&relay, None, CancellationToken::new(), None).await;
        // Linger 0: the close is a reset (the drop does not block: nothing is unsent).
        #[allow(deprecated)]
        browser.set_linger(Some(Duration::ZERO)).unwrap();
        drop(browser);
        let (ending, _) = ended(task).await;
        assert!(
            matches!(ending, Ending::Error | Ending::Closed),
            "{ending:?}"
        );
        let (mut browser, mut qlik, task) =
            tunnel(&relay, None, CancellationToken::new(), None).await;
        browser.write_all(b"still").await.unwrap();
        let mut got = [0u8; 5];
        qlik.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"still");
        drop((browser, qlik));
        ended(task).await;
    }

    #[tokio::test]
    async fn after_a_panic_on_the_relay_thread_its_tunnels_end_and_new_ones_stay_on_tokio() {
        let relay = Arc::new(Relay::default());
        let observer: Observer = Box::new(|_: &[u8]| panic!("an engine observer failed"));
        let (mut browser, mut qlik, task) =
            tunnel(&relay, None, CancellationToken::new(), Some(observer)).await;
        qlik.write_all(b"boom").await.unwrap();
        assert_eq!(ended(task).await.0, Ending::Shutdown);
        let mut b = [0u8; 4];
        assert_eq!(
            browser.read(&mut b).await.unwrap(),
            0,
            "closed with the thread"
        );
        // The next tunnel is given back, to be copied on tokio.
        let (_b, client) = socket_pair().await;
        let (_q, upstream) = socket_pair().await;
        let r = relay
            .run(client, upstream, None, CancellationToken::new(), None)
            .await;
        assert!(r.is_err(), "a relay whose thread ended takes no tunnel");
    }

    #[tokio::test]
    async fn many_tunnels_at_once_each_get_their_own_bytes() {
        let relay = Arc::new(Relay::default());
        let mut all = Vec::new();
        for _ in 0..40 {
            all.push(tunnel(&relay, None, CancellationToken::new(), None).await);
        }
        let echoed = Arc::new(AtomicUsize::new(0));
        let mut jobs = Vec::new();
        for (i, (mut browser, mut qlik, task)) in all.into_iter().enumerate() {
            let echoed = echoed.clone();
            jobs.push(tokio::spawn(async move {
                for round in 0..20u32 {
                    let msg = format!("tunnel {i} round {round}");
                    browser.write_all(msg.as_bytes()).await.unwrap();
                    let mut got = vec![0u8; msg.len()];
                    qlik.read_exact(&mut got).await.unwrap();
                    qlik.write_all(&got).await.unwrap();
                    browser.read_exact(&mut got).await.unwrap();
                    assert_eq!(got, msg.as_bytes());
                }
                echoed.fetch_add(1, Ordering::Relaxed);
                drop((browser, qlik));
                ended(task).await
            }));
        }
        for j in jobs {
            assert_eq!(j.await.unwrap().0, Ending::Closed);
        }
        assert_eq!(echoed.load(Ordering::Relaxed), 40);
    }
}
