//! The qsguard command line: run the guard, check a config, or run the built-in demo (the guard
//! in front of the Qlik Sense simulator, all on loopback).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use qsguard::logging::{self, LogFormat};
use qsguard::{Config, Guard};

/// jemalloc instead of the C library's allocator (as Pingora does): a request still
/// allocates (hyper's HTTP/2 streams, header maps, frames), and glibc's general
/// paths (`_int_malloc`, `_int_free`, consolidation) cost some 2,800 instructions per HTTP/2
/// request more, while an idle proxied WebSocket takes less memory (1.95 KiB, glibc 2.15).
/// mimalloc was as fast but held 5.1 KiB per idle WebSocket. Measured with benches/cost.sh and
/// benches/load.sh (ARCHITECTURE.md, "Allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "qsguard",
    version,
    about = "A reverse proxy for Qlik Sense that keeps sessions alive and users under the session limit"
)]
struct Cli {
    /// The configuration file (see config/qsguard.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log lines as text or JSON.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    /// Log level or filter (RUST_LOG overrides it).
    #[arg(long, default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the guard with --config FILE (the default when no command is given).
    Run,
    /// Check a configuration file and exit: non-zero, naming the bad key, when it is invalid.
    CheckConfig { file: PathBuf },
    /// List live sessions (from a running guard's admin listener).
    Sessions {
        /// Only this user, as DIRECTORY\\userid.
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// End one session (by the hash `qsguard sessions` shows).
    EndSession {
        hash: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// End all sessions of a user (DIRECTORY\\userid).
    EndUser {
        user: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Re-read the config file (what SIGHUP does); a bad config is refused and named.
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the Qlik nodes: state, weight, live sessions, in-flight requests, last check.
    Upstreams {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Send no new sessions to a node; its sessions stay until they end (for patching).
    Drain {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Let a drained node take new sessions again.
    Undrain {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print cookie and session events; --follow keeps printing new ones.
    Events {
        #[arg(long)]
        follow: bool,
        /// Only this kind (cookie_lost, set_cookie_folded, session_restored, ...).
        #[arg(long)]
        kind: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Probe the cookie round trip from this machine through whatever stands in front of the
    /// guard, and say what arrived intact, dropped, folded or changed.
    Doctor {
        /// The address users open, e.g. https://qlik.example.com
        url: String,
        /// The guard's cookie-check path (diagnostics.cookie_check_path).
        #[arg(long, default_value = "/__qsguard/cookie-check")]
        path: String,
        /// Also check the guard itself through its admin listener (/readyz: the Qlik nodes,
        /// the QPS REST API), e.g. http://127.0.0.1:9090; the token, if the listener needs
        /// one, from QSGUARD_ADMIN_TOKEN.
        #[arg(long)]
        admin: Option<String>,
    },
    /// Run the guard in front of the built-in Qlik Sense simulator on loopback.
    Demo {
        /// Where the guard listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where the admin listener listens.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
    },
}

/// How the ops commands reach the admin listener.
#[derive(clap::Args)]
struct AdminArgs {
    /// The admin listener's URL.
    #[arg(long = "admin", default_value = "http://127.0.0.1:9090")]
    url: String,
    /// A file with the bearer token (else the QSGUARD_ADMIN_TOKEN environment variable).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

impl AdminArgs {
    fn admin(self) -> Result<qsguard::ops::Admin, String> {
        let token = match &self.token_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| format!("cannot read {}: {e}", f.display()))?
                    .trim()
                    .to_string(),
            ),
            None => std::env::var("QSGUARD_ADMIN_TOKEN").ok(),
        };
        Ok(qsguard::ops::Admin {
            url: self.url,
            token,
        })
    }
}

/// Runs an ops command: prints its output, or its error with exit code 1.
fn ops<F>(f: F) -> ExitCode
where
    F: std::future::Future<Output = Result<String, String>>,
{
    match runtime(1).block_on(f) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("qsguard: {e}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format, &cli.log_level);
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(c) => {
                println!("{}: ok", file.display());
                println!("{}", c.snapshot_text());
                println!("{}", c.cluster_text());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                ExitCode::from(2)
            }
        },
        Command::Run => {
            let Some(path) = cli.config else {
                eprintln!(
                    "qsguard: give a configuration with --config FILE, or try `qsguard demo`"
                );
                return ExitCode::from(2);
            };
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{}: {e}", path.display());
                    return ExitCode::from(2);
                }
            };
            let workers = config.server.workers;
            runtime(workers).block_on(async move {
                match Guard::start(config).await {
                    Ok(guard) => {
                        run_until_signal(guard).await;
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("qsguard: {e}");
                        ExitCode::from(1)
                    }
                }
            })
        }
        Command::Demo { listen, admin } => runtime(0).block_on(demo(listen, admin)),
        Command::Sessions { user, admin } => {
            ops(async move { admin.admin()?.sessions(user.as_deref()).await })
        }
        Command::EndSession { hash, admin } => {
            ops(async move { admin.admin()?.end_session(&hash).await })
        }
        Command::EndUser { user, admin } => {
            ops(async move { admin.admin()?.end_user(&user).await })
        }
        Command::Reload { admin } => ops(async move { admin.admin()?.reload().await }),
        Command::Upstreams { admin } => ops(async move { admin.admin()?.upstreams().await }),
        Command::Drain { name, admin } => {
            ops(async move { admin.admin()?.drain(&name, true).await })
        }
        Command::Undrain { name, admin } => {
            ops(async move { admin.admin()?.drain(&name, false).await })
        }
        Command::Events {
            follow,
            kind,
            admin,
        } => ops(async move {
            admin.admin()?.events(follow, kind.as_deref()).await?;
            Ok(String::new())
        }),
        Command::Doctor { url, path, admin } => {
            let admin = admin.map(|url| qsguard::ops::Admin {
                url,
                token: std::env::var("QSGUARD_ADMIN_TOKEN").ok(),
            });
            match runtime(1).block_on(qsguard::ops::doctor(&url, &path, admin.as_ref())) {
                Ok((report, clean)) => {
                    print!("{report}");
                    if clean {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(3)
                    }
                }
                Err(e) => {
                    eprintln!("qsguard doctor: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn runtime(workers: usize) -> tokio::runtime::Runtime {
    let mut b = if workers == 1 {
        // One worker: a current-thread runtime has no cross-thread hand-offs at all.
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if workers > 1 {
            b.worker_threads(workers);
        }
        b
    };
    b.enable_all()
        .build()
        .expect("cannot start the tokio runtime")
}

/// Serves until SIGTERM or ctrl-c, then shuts down gracefully; a second signal exits at once.
/// SIGHUP reloads the config file; SIGUSR2 hands the listeners to a new binary (see
/// `server::handover`).
async fn run_until_signal(guard: Guard) {
    use qsguard::server::handover;
    use tokio::signal::unix::{signal, SignalKind};
    // Every handler first, each listened to for the whole run (a signal that comes while a
    // reload is applied is not lost): once systemd, or the process this one replaces, hears
    // that this one serves, a SIGHUP or SIGTERM may come at once, and its default action
    // would kill the process.
    let listen = |kind: SignalKind, name: &str| {
        signal(kind).unwrap_or_else(|e| panic!("cannot listen for {name}: {e}"))
    };
    let mut term = listen(SignalKind::terminate(), "SIGTERM");
    let mut int = listen(SignalKind::interrupt(), "SIGINT");
    let mut hup = listen(SignalKind::hangup(), "SIGHUP");
    let mut usr2 = listen(SignalKind::user_defined2(), "SIGUSR2");
    handover::announce_ready();
    let stopper = guard.stopper();
    let control = guard.control().clone();
    let mut waiter = tokio::spawn(guard.wait());
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = &mut waiter => return,
            _ = hup.recv() => {
                handover::sd_notify("RELOADING=1");
                let c = control.clone();
                match tokio::task::spawn_blocking(move || c.reload()).await {
                    Ok(Ok(changes)) => tracing::info!("config reloaded (SIGHUP): {changes}"),
                    Ok(Err(e)) => tracing::error!("reload refused, the running config stays: {e}"),
                    Err(e) => tracing::error!("reload failed: {e}"),
                }
                handover::sd_notify("READY=1");
            }
            // In a task: the signals (a SIGTERM meanwhile) are still heard while it waits.
            _ = usr2.recv() => {
                let c = control.clone();
                tokio::spawn(async move { handover::upgrade_and_stop(&c).await });
            }
        }
    }
    tracing::info!("shutting down: finishing in-flight requests (a second signal exits now)");
    handover::sd_notify("STOPPING=1");
    stopper.cancel();
    tokio::select! {
        _ = waiter => {}
        _ = term.recv() => tracing::warn!("second signal: exiting now"),
        _ = int.recv() => tracing::warn!("second signal: exiting now"),
    }
}

async fn demo(listen: SocketAddr, admin: SocketAddr) -> ExitCode {
    use qsguard::sim::{SimAuth, SimConfig, Simulator};
    let mut sim_config = SimConfig::default();
    // A real browser answers with NTLMv2, which the simulator does not check: the demo takes
    // the user its Type 3 names (still only on the connection that holds the challenge).
    sim_config.virtual_proxies[0].auth = SimAuth::Windows {
        accept_any_proof: true,
    };
    let sim = match Simulator::start(sim_config, SocketAddr::from(([127, 0, 0, 1], 0))).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("qsguard demo: cannot start the Qlik simulator: {e}");
            return ExitCode::from(1);
        }
    };
    let text = format!(
        r#"
[server]
listen = "{listen}"
[admin]
listen = "{admin}"
[[upstream]]
url = "http://{sim}"
name = "sim-node1"
[[virtual_proxy]]
prefix = ""
session_cookie = "X-Qlik-Session-HTTP"
[[virtual_proxy]]
prefix = "hdr"
session_cookie = "X-Qlik-Session-hdr-HTTP"
identity_header = "hdr-usr"
"#,
        sim = sim.addr()
    );
    let config = Config::parse(&text).expect("the demo config is valid");
    let guard = match Guard::start(config).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("qsguard demo: {e}\n(another program uses the port? try --listen 127.0.0.1:0 --admin 127.0.0.1:0)");
            return ExitCode::from(1);
        }
    };
    println!(
        "\nqsguard demo: the guard in front of a Qlik Sense simulator, all on loopback.\n\
         \n  Hub through the guard (Windows login: the browser asks for a user, e.g. DEMO\\alice, and any password):\n                               http://{addr}/hub/\n  \
         Header-auth virtual proxy:   curl -i -H 'hdr-usr: DEMO\\bob' http://{addr}/hdr/hub/\n  \
         Admin listener:              http://{admin}/healthz\n  \
         The simulator itself:        http://{sim}/  (QPS REST API on {api})\n\
         \nTry: open the hub, delete the X-Qlik-Session-HTTP cookie (what a browser restart does) \
         and reload: the guard restores the same Qlik session instead of making a new one. Ctrl-C stops.\n",
        addr = guard.addr,
        admin = guard.admin_addr,
        sim = sim.addr(),
        api = sim.api_addr(),
    );
    run_until_signal(guard).await;
    sim.stop().await;
    ExitCode::SUCCESS
}
