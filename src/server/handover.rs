//! Zero-downtime upgrade: a new qsguard binary takes the listening sockets over from the
//! running one, so that no connection is refused while the binary changes.
//!
//! Why inheritance and not two processes binding one port with `SO_REUSEPORT`: when a
//! `SO_REUSEPORT` listener closes, Linux resets the connections still waiting in its own
//! accept queue (unless `net.ipv4.tcp_migrate_req` is on), so a restart under load refuses a
//! few. An inherited socket has one accept queue that both processes take from; the old one
//! stops taking and the queue stays, so nothing waiting in it is lost. This is nginx's
//! binary upgrade, done on SIGUSR2:
//!
//! 1. the old process writes the session snapshot, then starts the same command line (the
//!    binary now on disk at its path) with the listening sockets open and their numbers in
//!    `QSGUARD_LISTEN_FDS`, and one end of a socket pair in `QSGUARD_READY_FD`;
//! 2. the new process loads the config and the snapshot, serves on the inherited sockets, and
//!    writes `ready` on the pair (and tells systemd its PID, see [`sd_notify`]);
//! 3. the old process stops accepting, finishes its in-flight requests and WebSockets within
//!    the grace period, and exits; its last snapshot goes to a side file (the new process
//!    owns the snapshot file now), which the new process merges once the old one is gone, so
//!    sessions made or used in the old process after step 1 are not lost.
//!
//! If the new process fails to start, or is not ready within [`READY_WAIT`], the old one
//! kills it, closes its copies of the sockets and goes on serving: an upgrade never leaves
//! nothing listening.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

use super::Control;

/// How long the new process may take to start serving.
pub const READY_WAIT: Duration = Duration::from_secs(60);

const LISTEN_FDS: &str = "QSGUARD_LISTEN_FDS";
const READY_FD: &str = "QSGUARD_READY_FD";
const PARENT_PID: &str = "QSGUARD_PARENT_PID";

/// The process this one replaces, if it was started by an upgrade.
pub fn predecessor() -> Option<u32> {
    std::env::var(PARENT_PID).ok()?.parse().ok()
}

/// Where a process that handed over writes its last snapshot: next to the snapshot file.
pub fn side_file(snapshot: &std::path::Path) -> std::path::PathBuf {
    snapshot.with_extension("handover")
}

/// Whether process `pid` still runs (a zombie does not).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Waits (polling) until the process this one replaced has exited, then merges its last
/// snapshot (`side`) into the table and removes the file.
pub async fn merge_when_gone(
    sessions: std::sync::Arc<crate::session::SessionGuard>,
    pid: u32,
    side: std::path::PathBuf,
    stop: tokio_util::sync::CancellationToken,
) {
    while running(pid) {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.cancelled() => return,
        }
    }
    if !side.exists() {
        return;
    }
    match sessions.merge_snapshot(&side) {
        Ok((merged, dropped)) => tracing::info!(
            merged,
            dropped,
            "sessions the previous process made or used after the handover merged"
        ),
        Err(e) => tracing::warn!("the previous process's last snapshot was not merged: {e}"),
    }
    let _ = std::fs::remove_file(&side);
}

/// The sockets handed to this process, by name, taken once each.
fn handed() -> &'static Mutex<HashMap<String, RawFd>> {
    static FDS: OnceLock<Mutex<HashMap<String, RawFd>>> = OnceLock::new();
    FDS.get_or_init(|| {
        let list = std::env::var(LISTEN_FDS).unwrap_or_default();
        Mutex::new(
            list.split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.parse().ok()?))
                })
                .collect(),
        )
    })
}

/// The listener named `key` that the previous process handed over, if it listens where the
/// config says (`want`; port 0 takes any port). One that does not is closed: the config was
/// changed in between, and the caller binds the new address.
pub fn inherited(key: &str, want: SocketAddr) -> Option<TcpListener> {
    let fd = handed()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(key)?;
    // Safety: the previous process put this descriptor number in our environment for us;
    // it is a listening socket it opened, and nothing else in this process owns it.
    let std = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    let _ = socket2::SockRef::from(&std).set_cloexec(true);
    let fits = std
        .local_addr()
        .is_ok_and(|a| a.ip() == want.ip() && (want.port() == 0 || a.port() == want.port()));
    if !fits {
        tracing::warn!(
            listener = key,
            "the handed-over socket is not at {want}: binding anew"
        );
        return None;
    }
    std.set_nonblocking(true).ok()?;
    let l = TcpListener::from_std(std).ok()?;
    tracing::info!(listener = key, addr = ?l.local_addr().ok(), "serving on the socket handed over by the previous process");
    Some(l)
}

/// Tells the process this one replaces (if any) that it serves now, and systemd too.
pub fn announce_ready() {
    if let Some(fd) = std::env::var(READY_FD)
        .ok()
        .and_then(|v| v.parse::<RawFd>().ok())
    {
        use std::io::Write;
        // Safety: as for the listeners, the previous process passed this end of its socket
        // pair to us alone.
        let mut pair = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
        if let Err(e) = pair.write_all(b"ready\n") {
            tracing::warn!("cannot tell the previous process that this one is ready: {e}");
        }
    }
    sd_notify(&format!("READY=1\nMAINPID={}", std::process::id()));
}

/// Starts the new binary on the listening sockets and waits until it serves; then this
/// process stops (see the module doc). Returns the new process's PID.
pub async fn upgrade(control: &Control) -> Result<u32, String> {
    if let (Some(g), Some(path)) = (control.proxy().sessions(), control.snapshot_file()) {
        let n = g
            .save_snapshot(&path)
            .map_err(|e| format!("cannot write the session snapshot {}: {e}", path.display()))?;
        tracing::info!(sessions = n, "session snapshot written for the new process");
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the binary: {e}"))?;
    // After the binary was replaced, the link to the running one reads "<path> (deleted)".
    let exe = std::path::PathBuf::from(
        exe.to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_string(),
    );
    let sockets = control.sockets();
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|e| format!("socket pair: {e}"))?;
    let inherit = |on: bool| {
        for (_, l) in &sockets {
            let _ = socket2::SockRef::from(&**l).set_cloexec(!on);
        }
        let _ = socket2::SockRef::from(&theirs).set_cloexec(!on);
    };
    let fds: Vec<String> = sockets
        .iter()
        .map(|(k, l)| format!("{k}={}", l.as_raw_fd()))
        .collect();
    // Ready to listen on our end before there is a child that could be left behind.
    ours.set_nonblocking(true)
        .map_err(|e| format!("socket pair: {e}"))?;
    let mut ours =
        tokio::net::UnixStream::from_std(ours).map_err(|e| format!("socket pair: {e}"))?;
    // A side file left by an earlier upgrade is stale: the new process must not merge it.
    if let Some(path) = control.snapshot_file() {
        let _ = std::fs::remove_file(side_file(&path));
    }
    // Inheritable only for the spawn.
    inherit(true);
    let spawned = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env(LISTEN_FDS, fds.join(","))
        .env(READY_FD, theirs.as_raw_fd().to_string())
        .env(PARENT_PID, std::process::id().to_string())
        .spawn();
    inherit(false);
    drop(theirs);
    let mut child = spawned.map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let pid = child.id();
    let mut said = Vec::new();
    let ready = tokio::time::timeout(READY_WAIT, ours.read_to_end(&mut said)).await;
    if matches!(ready, Ok(Ok(_))) && said.starts_with(b"ready") {
        // The child outlives this process: it is reaped by whoever adopts it.
        drop(child);
        return Ok(pid);
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(match ready {
        Err(_) => format!("the new process {pid} was not ready within {READY_WAIT:?}: stopped it"),
        _ => format!("the new process {pid} ended before it served (see its log lines above)"),
    })
}

/// Runs an upgrade and, once the new process serves, stops this one; on failure this one
/// goes on serving. What SIGUSR2 does.
pub async fn upgrade_and_stop(control: &Control) {
    static UPGRADING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    use std::sync::atomic::Ordering;
    if UPGRADING.swap(true, Ordering::AcqRel) {
        tracing::warn!("an upgrade is under way or done: this SIGUSR2 is ignored");
        return;
    }
    // After a handover this process only finishes its work: never a second successor.
    if !upgrade_once(control).await {
        UPGRADING.store(false, Ordering::Release);
    }
}

/// Returns whether the new process took over.
async fn upgrade_once(control: &Control) -> bool {
    tracing::info!("upgrade: starting the new binary on the listening sockets");
    sd_notify("RELOADING=1");
    match upgrade(control).await {
        Ok(pid) => {
            tracing::info!(
                new_pid = pid,
                "upgrade: the new process serves; this one finishes its requests and stops"
            );
            control.hand_over();
            true
        }
        Err(e) => {
            tracing::error!("upgrade failed, this process goes on serving: {e}");
            sd_notify("READY=1");
            false
        }
    }
}

/// A state line for systemd (`Type=notify`, `NotifyAccess=all`): ready, reloading, stopping,
/// and the PID of the process that serves now. Nothing without `NOTIFY_SOCKET`.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
        }
        None => sock.send_to(state.as_bytes(), &path),
    };
    if let Err(e) = sent {
        tracing::debug!("cannot notify systemd: {e}");
    }
}
