//! Wiring: a validated [`Config`] becomes a running pingora `Server`.
//!
//! ```text
//! pingora Server (our signal handling: lifecycle::Signals)
//!  ├─ admin           pingora HTTP service  -> admin::AdminApp          (optional)
//!  ├─ BG health       health::HealthService (all pools)
//!  ├─ listener <name> listener::ListenerService -> ListenerApp  × N, each waits for BG health
//!  └─ BG drain        lifecycle::DrainService
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use log::{info, warn};
use pingora::apps::http_app::HttpServer;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;

use crate::admin::AdminApp;
use crate::config::Config;
use crate::health::HealthService;
use crate::lifecycle::{DrainService, Readiness, Signals};
use crate::listener::{ListenerApp, ListenerService};
use crate::metrics::Metrics;
use crate::pool::Pool;

/// How the process was asked to start.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Fork into the background (`-d`).
    pub daemon: bool,
    /// Take the listening sockets of a running instance (`-u`).
    pub upgrade: bool,
}

/// Why sluice could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// An address cannot be listened on.
    #[error("cannot listen on {addr} ({path}): {source}")]
    Bind {
        /// Where it is configured.
        path: String,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Check that every configured address can be bound, so a port conflict is a
/// clear error now rather than a listener that silently never starts.
fn check_binds(config: &Config) -> Result<(), StartError> {
    let mut addrs: Vec<(String, SocketAddr)> = Vec::new();
    if let Some(a) = &config.admin {
        addrs.push(("admin.bind".to_string(), a.bind));
    }
    for l in &config.listeners {
        addrs.extend(
            l.bind
                .iter()
                .map(|a| (format!("listeners.{}.bind", l.name), *a)),
        );
    }
    for (path, addr) in addrs {
        let probe = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )
        .and_then(|s| {
            // As pingora binds: SO_REUSEADDR, so only a live listener conflicts.
            s.set_reuse_address(true)?;
            s.bind(&addr.into())
        });
        probe.map_err(|source| StartError::Bind { path, addr, source })?;
    }
    Ok(())
}

/// The pingora `ServerConf` for our settings.
fn server_conf(config: &Config, options: &RunOptions) -> ServerConf {
    let s = &config.server;
    let mut conf = ServerConf {
        threads: s.threads,
        daemon: options.daemon,
        pid_file: s.pid_file.clone(),
        upgrade_sock: s.upgrade_sock.clone(),
        ..ServerConf::default()
    };
    // pingora sleeps this long unconditionally after listeners close; the drain
    // service exits earlier once connections are done, so this only backstops it.
    conf.grace_period_seconds = Some(s.shutdown_timeout.as_secs() + 2);
    conf.graceful_shutdown_timeout_seconds = Some(1);
    conf
}

/// Build every service and run until shut down.
pub fn run(config: Config, options: RunOptions) -> Result<(), StartError> {
    if !options.upgrade {
        check_binds(&config)?;
    }
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::new(config.pools.len(), config.listeners.len()));
    let pools: Vec<Arc<Pool>> = config
        .pools
        .iter()
        .map(|p| Pool::new(p, &metrics))
        .collect();

    let opt = Opt {
        upgrade: options.upgrade,
        daemon: options.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf(&config, &options));
    server.bootstrap();

    if let Some(admin) = &config.admin {
        let app = AdminApp::new(Arc::clone(&metrics), pools.clone(), Arc::clone(&readiness));
        let mut svc = Service::new("admin".to_string(), HttpServer::new_app(app));
        svc.add_tcp(&admin.bind.to_string());
        svc.threads = Some(1);
        server.add_service(svc);
        info!("admin listening on http://{}", admin.bind);
    }

    let health = server.add_service(background_service(
        "health",
        HealthService::new(pools.clone(), Arc::clone(&readiness)),
    ));

    let mut open_gauges = Vec::new();
    for l in &config.listeners {
        let pool = pools
            .iter()
            .find(|p| p.name == l.pool)
            .cloned()
            .expect("validation guarantees every listener's pool exists");
        let lm = metrics.listener(&l.name);
        open_gauges.push(lm.active.clone());
        let app = ListenerApp::new(l, pool, lm);
        let svc = ListenerService::new(l, app, config.server.threads, Arc::clone(&readiness));
        let handle = server.add_service(svc);
        handle.add_dependency(&health);
        info!(
            "listener {} on {} -> pool {} (opens after the first health-check round)",
            l.name,
            l.bind
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            l.pool
        );
    }
    for w in &config.warnings {
        warn!("{w}");
    }
    server.add_service(background_service(
        "drain",
        DrainService::new(open_gauges, config.server.shutdown_timeout),
    ));

    let signals = Signals::new(
        readiness,
        config.server.grace_period,
        config.server.shutdown_timeout,
    );
    server.run(RunArgs {
        shutdown_signal: Box::new(signals),
    });
    Ok(())
}
