//! Wiring: a validated [`Config`] becomes a running pingora `Server`.
//!
//! ```text
//! pingora Server (our signal handling: lifecycle::Signals; SIGHUP reloads)
//!  ├─ admin      pingora HTTP service -> admin::AdminApp     (optional)
//!  ├─ BG health  health::HealthService (a loop per pool)
//!  ├─ listeners  traffic::TrafficService (every listener; waits for BG health)
//!  └─ BG drain   lifecycle::DrainService
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
use crate::health::{HealthChecks, HealthService};
use crate::lifecycle::{DrainService, Signals};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::state::State;
use crate::traffic::{Traffic, TrafficService};

/// How the process was asked to start.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// The configuration file (re-read on reload).
    pub config_path: std::path::PathBuf,
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
        crate::traffic::probe_bind(addr).map_err(|source| StartError::Bind {
            path,
            addr,
            source,
        })?;
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
    conf.grace_period_seconds = Some(s.shutdown_timeout.as_secs().saturating_add(2));
    conf.graceful_shutdown_timeout_seconds = Some(1);
    conf
}

/// Build every service and run until shut down.
pub fn run(config: Config, options: RunOptions) -> Result<(), StartError> {
    if !options.upgrade {
        check_binds(&config)?;
    }
    let metrics = Arc::new(Metrics::new());
    metrics.config_loaded_now();
    let pools: Vec<Arc<Pool>> = config
        .pools
        .iter()
        .map(|p| Pool::new(p, &metrics))
        .collect();
    let listeners = config
        .listeners
        .iter()
        .map(|l| {
            let pool = pools
                .iter()
                .find(|p| p.name == l.pool)
                .cloned()
                .expect("validation guarantees every listener's pool exists");
            (l.clone(), pool)
        })
        .collect();
    let traffic = Traffic::new(Arc::clone(&metrics), listeners);
    let health = HealthChecks::new(pools.clone());

    let opt = Opt {
        upgrade: options.upgrade,
        daemon: options.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf(&config, &options));
    server.bootstrap();

    for w in &config.warnings {
        warn!("{w}");
    }
    let (grace, timeout) = (config.server.grace_period, config.server.shutdown_timeout);
    let admin_bind = config.admin.as_ref().map(|a| a.bind);
    let state = State::new(
        options.config_path.clone(),
        config,
        Arc::clone(&metrics),
        pools,
        Arc::clone(&traffic),
        Arc::clone(&health),
    );

    if let Some(bind) = admin_bind {
        let app = AdminApp::new(Arc::clone(&state));
        let mut svc = Service::new("admin".to_string(), HttpServer::new_app(app));
        svc.add_tcp(&bind.to_string());
        svc.threads = Some(1);
        server.add_service(svc);
        info!("admin listening on http://{bind}");
    }
    let health_handle = server.add_service(background_service("health", HealthService(health)));
    let traffic_handle = server.add_service(TrafficService(Arc::clone(&traffic)));
    traffic_handle.add_dependency(&health_handle);
    info!("listeners open after the first health-check round");
    server.add_service(background_service(
        "drain",
        DrainService::new(Arc::clone(&traffic), timeout),
    ));

    server.run(RunArgs {
        shutdown_signal: Box::new(Signals::new(state, grace, timeout)),
    });
    Ok(())
}
