//! The `envgate` command: `run`, `check` and `demo`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{signal, Signal, SignalKind};

use envgate::accesslog::{self, AccessLog};
use envgate::config::{self, LoadError};
use envgate::control::{client, fleet, watch, Source};
use envgate::health::NodeRegistry;
use envgate::server::{self, Options, Server};

/// mimalloc rather than glibc's malloc: an HTTP/2 stream allocates its task (the exchange's
/// future, a few KiB) and its header maps and HPACK buffers, sizes that glibc serves from its
/// bins with `malloc_consolidate` and `unlink_chunk` instead of its per-thread cache. With
/// mimalloc an HTTP/2 request costs about 7% fewer instructions, at the same resident memory.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "envgate",
    version,
    about = "Layer-7 load balancer and router for runtime environments"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the topology in FILE.
    Run {
        /// The topology file.
        #[arg(long, default_value = "config/envgate.yaml")]
        config: PathBuf,
        /// Worker threads (default: one per CPU; the WORKERS variable also sets it).
        #[arg(long, env = "WORKERS")]
        workers: Option<usize>,
        /// Which codec serves HTTP/1.1 connections: `fast`, envgate's own for what it takes
        /// (HTTP/1.1 requests, cleartext or TLS, while every node speaks HTTP/1.1 in
        /// clear) and hyper for the rest (HTTP/2, upgrades, CONNECT, HTTP/1.0, unusual
        /// framing), or `hyper` for every connection. The ENVGATE_HTTP1 variable also sets
        /// it.
        #[arg(long, value_enum, env = "ENVGATE_HTTP1", default_value_t = Http1Arg::Fast)]
        http1: Http1Arg,
        /// Format of the diagnostic log (stderr) and the access log.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// Where the access log goes: `-` for stdout, a file (reopened on SIGUSR1), or
        /// `off`. The topology's `access_log` key turns it off or samples 2xx answers.
        #[arg(long, default_value = "-")]
        access_log: String,
        /// Fleet mode: follow the topology at URL (another instance's
        /// `http://HOST:PORT/api/v1/topology`, or an https:// URL in front of it); the config file gives this instance's
        /// `listeners` and `control`, and the topology to serve until the source answers.
        #[arg(long)]
        topology_url: Option<String>,
        /// How often the source is polled (with If-None-Match).
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        poll: std::time::Duration,
        /// A file holding a bearer token for the source.
        #[arg(long)]
        topology_token_file: Option<PathBuf>,
        /// For an https:// topology URL: a PEM file of the CAs that sign the source's
        /// certificate (default: the system's roots).
        #[arg(long)]
        topology_ca: Option<PathBuf>,
        /// Serve handoffs on this Unix socket: a new instance started with `--takeover`
        /// on it receives the listening sockets, and this one then drains and exits.
        #[arg(long)]
        upgrade_socket: Option<PathBuf>,
        /// Take the listening sockets of the instance serving `--upgrade-socket` PATH,
        /// then tell it to drain: a restart or upgrade that refuses no connection.
        #[arg(long)]
        takeover: Option<PathBuf>,
    },
    /// Validate topology files without serving: exit 0 valid, 1 invalid, 2 unreadable.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Apply FILE to a running instance through its control endpoint (validated there
    /// whole; exit 0 applied, 1 refused, 2 unreachable).
    Apply {
        file: PathBuf,
        /// Show the changes and the problems without applying.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// The running instance's environments, nodes (health, drain) and recent applies.
    Status {
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Where a request to URL would go on the running instance, and why.
    Explain {
        /// `http://host[:port]/path?query`
        url: String,
        #[arg(long, default_value = "GET")]
        method: String,
        /// A request header, `Name: value` (repeatable; `Cookie: ...` included).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Run demo nodes and a demo topology on loopback, and print what to try.
    Demo {
        /// Port of the demo's host-routed listener; the port-wide one is this plus 3.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        #[arg(long, env = "WORKERS")]
        workers: Option<usize>,
    },
}

/// Where the control endpoint is: `--control` and `--token-file`, or the topology file's
/// `control` key.
#[derive(clap::Args)]
struct Endpoint {
    /// The topology file that names the endpoint and its token file.
    #[arg(long, default_value = "config/envgate.yaml")]
    config: PathBuf,
    /// The endpoint's address (instead of the topology file's `control.bind`).
    #[arg(long)]
    control: Option<std::net::SocketAddr>,
    /// The file holding the bearer token for writes.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Http1Arg {
    Hyper,
    Fast,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { files } => check(&files),
        Command::Run {
            config,
            workers,
            http1,
            log_format,
            access_log,
            topology_url,
            poll,
            topology_token_file,
            topology_ca,
            upgrade_socket,
            takeover,
        } => {
            init_logging(log_format);
            let format = match log_format {
                LogFormat::Text => accesslog::Format::Text,
                LogFormat::Json => accesslog::Format::Json,
            };
            let target = match access_log.as_str() {
                "off" => None,
                "-" => Some(accesslog::Target::Stdout),
                path => Some(accesslog::Target::File(path.into())),
            };
            let follow = match topology_url
                .map(|u| {
                    fleet::Follow::with_ca(&u, poll, topology_token_file, topology_ca.as_deref())
                })
                .transpose()
            {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("envgate: {e}");
                    return ExitCode::from(2);
                }
            };
            match run(
                config,
                workers.unwrap_or(0),
                match http1 {
                    Http1Arg::Hyper => server::Http1::Hyper,
                    Http1Arg::Fast => server::Http1::Fast,
                },
                target.map(|t| (t, format)),
                follow,
                Upgrade {
                    serve: upgrade_socket,
                    takeover,
                },
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("envgate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Apply {
            file,
            dry_run,
            endpoint,
        } => remote(&endpoint, |t| {
            let text = std::fs::read(&file)
                .map_err(|e| client::ClientError::Setup(format!("{}: {e}", file.display())))?;
            let path = if dry_run {
                "/api/v1/topology?dry_run=true"
            } else {
                "/api/v1/topology"
            };
            t.call(http::Method::PUT, path, text.into())
        }),
        Command::Status { endpoint } => remote(&endpoint, |t| {
            t.call(http::Method::GET, "/api/v1/status", Default::default())
        }),
        Command::Explain {
            url,
            method,
            headers,
            endpoint,
        } => remote(&endpoint, |t| {
            let uri: http::Uri = url
                .parse()
                .map_err(|e| client::ClientError::Setup(format!("{url}: {e}")))?;
            let host = uri.host().unwrap_or("");
            let port = uri
                .port_u16()
                .unwrap_or(if uri.scheme_str() == Some("https") {
                    443
                } else {
                    80
                });
            let target = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let mut q = format!(
                "/api/v1/explain?host={}&port={port}&path={}&method={}",
                client::encode(host),
                client::encode(target),
                client::encode(&method)
            );
            for h in &headers {
                let (name, value) = h.split_once(':').unwrap_or((h, ""));
                if name.trim().eq_ignore_ascii_case("cookie") {
                    q.push_str(&format!("&cookie={}", client::encode(value.trim())));
                } else {
                    q.push_str(&format!(
                        "&header={}",
                        client::encode(&format!("{}:{}", name.trim(), value.trim()))
                    ));
                }
            }
            t.call(http::Method::GET, &q, Default::default())
        }),
        Command::Demo { port, workers } => {
            init_logging(LogFormat::Text);
            match envgate::demo::run(port, workers.unwrap_or(0)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("envgate demo: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Runs one call against a running instance: prints the answer; exit 0 on success, 1 when
/// the endpoint refused, 2 when it could not be reached.
fn remote(
    endpoint: &Endpoint,
    call: impl FnOnce(&client::Target) -> Result<(http::StatusCode, bytes::Bytes), client::ClientError>,
) -> ExitCode {
    let target = match client::Target::find(
        &endpoint.config,
        endpoint.control,
        endpoint.token_file.clone(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("envgate: {e}");
            return ExitCode::from(2);
        }
    };
    match call(&target) {
        Ok((status, body)) => {
            println!("{}", client::render(status, &body));
            if status.is_success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("envgate: {e}");
            ExitCode::from(2)
        }
    }
}

fn check(files: &[PathBuf]) -> ExitCode {
    let mut worst = 0u8;
    for file in files {
        match config::load_file(file) {
            Ok(t) => {
                for w in &t.warnings {
                    println!("{}: warning: {w}", file.display());
                }
                // Nodes as the document defines them; those addressed by host names
                // also by their resolved members.
                let defined = t.nodes.iter().filter(|n| n.dns.is_none()).count() + t.dns.len();
                let members = if t.dns.is_empty() {
                    String::new()
                } else {
                    let m: usize = t.dns.iter().map(|d| d.answer.addrs.len()).sum();
                    format!(" ({} by host name, {m} resolved addresses)", t.dns.len())
                };
                println!(
                    "{}: ok ({} listeners, {defined} nodes{members}, {} environments)",
                    file.display(),
                    t.listeners.len(),
                    t.environments.len()
                )
            }
            Err(LoadError::Invalid(errors)) => {
                for e in errors {
                    println!("{}: {e}", file.display());
                }
                worst = worst.max(1);
            }
            Err(LoadError::Parse(e)) => {
                println!("{}: {e}", file.display());
                worst = worst.max(1);
            }
            Err(e @ LoadError::Io { .. }) => {
                eprintln!("{e}");
                worst = 2;
            }
        }
    }
    ExitCode::from(worst)
}

/// `--upgrade-socket` and `--takeover`.
struct Upgrade {
    serve: Option<PathBuf>,
    takeover: Option<PathBuf>,
}

fn run(
    path: PathBuf,
    workers: usize,
    http1: server::Http1,
    access_log: Option<(accesslog::Target, accesslog::Format)>,
    follow: Option<fleet::Follow>,
    upgrade: Upgrade,
) -> anyhow::Result<()> {
    // Signal handlers first: a SIGHUP or SIGTERM that arrives while the topology is read,
    // the listeners bound or the workers started must not meet the default action (which
    // ends the process). It waits in its stream until `wait_for_signals` takes it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let signals = {
        let _runtime = rt.enter();
        Signals::register().context("cannot install signal handlers")?
    };
    let registry = Arc::new(NodeRegistry::default());
    let local = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    // Fleet mode starts from the source's topology when it answers, else from the file's.
    let base_dir = base_dir_of(&path);
    let parse_local =
        || config::parse(&local, &base_dir).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()));
    let mut fetched_hash = None;
    let (document, topology) = match &follow {
        Some(f) => match fleet::fetch_once(f, &local) {
            // A document this instance refuses does not stop it: it starts from its file.
            Ok((merged, hash)) => match config::parse(&merged, &base_dir) {
                Ok(t) => {
                    fetched_hash = Some(hash);
                    (merged, t)
                }
                Err(e) => {
                    tracing::warn!(source = %f.url, error = %e, "fleet: the source's topology is refused here; starting from the file's");
                    (local.clone(), parse_local()?)
                }
            },
            Err(e) => {
                tracing::warn!(source = %f.url, error = %e, "fleet: the source did not answer; starting from the file's topology");
                (local.clone(), parse_local()?)
            }
        },
        None => (local.clone(), parse_local()?),
    };
    let access_log = match access_log {
        Some((target, format)) => Some(
            AccessLog::start(target.clone(), format)
                .with_context(|| format!("cannot open the access log {target:?}"))?,
        ),
        None => None,
    };
    // Taking over: the running instance's sockets serve instead of new ones.
    // No instance there to take over from (its socket is missing or nobody listens):
    // start by binding, so one command line serves both a first start and an upgrade.
    let mut inherited = match &upgrade.takeover {
        Some(p) => match envgate::upgrade::take_over(p) {
            Ok(i) => Some(i),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                tracing::info!(socket = %p.display(), "upgrade: no running instance to take over from; binding the listeners");
                None
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot take the listening sockets over from {}",
                    p.display()
                )))
            }
        },
        None => None,
    };
    let mut listeners = Vec::new();
    let mut handed = Vec::new();
    for l in &topology.listeners {
        let mut got = inherited
            .as_mut()
            .map(|i| i.take(&l.name, l.bind))
            .unwrap_or_default();
        let sock = if got.is_empty() {
            server::bind(l.bind)
                .with_context(|| format!("cannot bind listener {:?} on {}", l.name, l.bind))?
        } else {
            got.remove(0)
        };
        listeners.push((l.name.clone(), sock));
        handed.extend(got.into_iter().map(|s| (l.name.clone(), s)));
    }
    if let (Some(i), Some(c)) = (inherited.as_mut(), &topology.control) {
        handed.extend(
            i.take(envgate::upgrade::CONTROL, c.bind)
                .into_iter()
                .map(|s| (envgate::upgrade::CONTROL.to_string(), s)),
        );
    }
    tracing::info!(
        config = %path.display(),
        listeners = topology.listeners.len(),
        nodes = topology.nodes.len(),
        environments = topology.environments.len(),
        "serving"
    );
    let server = server::start(
        topology,
        registry,
        listeners,
        Options {
            workers,
            document,
            base_dir,
            file: Some(path.clone()),
            access_log: access_log.as_ref().map(|l| l.sink()),
            inherited: handed,
            http1,
        },
    )?;
    let (handed_over, handoff) = tokio::sync::mpsc::unbounded_channel::<()>();
    if let Some(p) = &upgrade.serve {
        envgate::upgrade::serve(p.clone(), server.shared().sockets.clone(), move || {
            let _ = handed_over.send(());
        })
        .with_context(|| format!("cannot serve handoffs on {}", p.display()))?;
    }
    // The file is watched (not in fleet mode, where the source is); a watch that cannot
    // start leaves SIGHUP.
    let (_watch, _fleet) = match follow {
        Some(f) => {
            if let Some(h) = fetched_hash {
                let control = server.control();
                control.set_fleet_hash(control.current().generation, h);
            }
            tracing::info!(source = %f.url, poll = ?f.poll, "fleet: following the source's topology");
            let fleet = fleet::spawn(server.control().clone(), local, f, None)
                .context("cannot start following the topology URL")?;
            (None, Some(fleet))
        }
        None => match watch::spawn(server.control().clone(), &path) {
            Ok(w) => (Some(w), None),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot watch the topology file; reload it with SIGHUP");
                (None, None)
            }
        },
    };
    // Certificates, keys and CA files are watched in every mode.
    let _files = match watch::spawn_files(server.control().clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the certificate files; reload them with SIGHUP");
            None
        }
    };
    // The instance this one replaces stops accepting and drains: the last step, once
    // nothing else here can fail.
    if let Some(i) = inherited {
        i.ready()
            .context("cannot tell the replaced instance to drain")?;
        tracing::info!("upgrade: took the listening sockets over");
    }
    // Under systemd (`Type=notify`): ready once every worker serves.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    wait_for_signals(&rt, signals, &server, &path, access_log.as_ref(), handoff)?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    // No topology change while draining.
    drop(_fleet);
    drop(_watch);
    drop(_files);
    tracing::info!("shutting down: draining connections");
    server.shutdown();
    if let Some(log) = access_log {
        log.close();
    }
    tracing::info!("stopped");
    Ok(())
}

/// Where relative paths in the topology file point.
fn base_dir_of(path: &std::path::Path) -> PathBuf {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf()
}

/// The signals `run` acts on, caught from the start.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    usr1: Signal,
}

impl Signals {
    /// Installs the handlers; must run inside the runtime that will wait on them.
    fn register() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
        })
    }
}

/// Blocks until SIGTERM or SIGINT; SIGHUP reloads the topology file, SIGUSR1 reopens the
/// access log file. A signal that arrived during start-up is acted on here (a SIGHUP then
/// re-reads the file once).
fn wait_for_signals(
    rt: &tokio::runtime::Runtime,
    signals: Signals,
    server: &Server,
    path: &std::path::Path,
    access_log: Option<&AccessLog>,
    mut handoff: tokio::sync::mpsc::UnboundedReceiver<()>,
) -> anyhow::Result<()> {
    let Signals {
        mut term,
        mut int,
        mut hup,
        mut usr1,
    } = signals;
    // systemd's watchdog, when the unit sets `WatchdogSec`: pinged at half the period from
    // this loop, which also serves the signals (a stuck loop stops the pings).
    let mut watchdog_usec = 0;
    let watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec)
        .then(|| std::time::Duration::from_micros(watchdog_usec / 2))
        .filter(|d| !d.is_zero());
    rt.block_on(async {
        let mut ping = tokio::time::interval(watchdog.unwrap_or(std::time::Duration::from_secs(3600)));
        loop {
            tokio::select! {
                _ = ping.tick(), if watchdog.is_some() => {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                }
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
                // A new instance took the listening sockets over: drain as on SIGTERM.
                Some(()) = handoff.recv() => return Ok(()),
                _ = usr1.recv() => if let Some(log) = access_log {
                    log.reopen();
                },
                // `apply` logs what it applied or why it refused.
                _ = hup.recv() => match std::fs::read_to_string(path) {
                    _ if server.control().following().is_some() => {
                        tracing::info!("fleet: SIGHUP ignored; the topology comes from the source");
                    }
                    Ok(text) => {
                        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
                        let _ = server.control().apply(Source::Signal, &text, false);
                        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
                    }
                    Err(e) => tracing::error!(source = "signal", file = %path.display(), error = %e, "topology file unreadable; the running topology stays"),
                },
            }
        }
    })
}
