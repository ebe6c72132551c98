//! The command line: flags, `-t` (test the configuration), start-up, and
//! the `healthcheck` and `ctl` subcommands.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH, MAX_PROBLEMS};
use crate::healthcheck;
use crate::server::{self, RunOptions};

/// sluice: a Layer-4 TCP load balancer built on Pingora.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
pub struct Cli {
    /// Configuration file.
    #[arg(short = 'c', long = "conf", value_name = "FILE", default_value = DEFAULT_CONFIG_PATH, global = true)]
    pub conf: PathBuf,
    /// Test the configuration and exit: 0 when valid, 1 with every problem when not.
    #[arg(short = 't', long = "test")]
    pub test: bool,
    /// Run in the background.
    #[arg(short = 'd', long = "daemon")]
    pub daemon: bool,
    /// Take over the listening sockets of the running instance (graceful upgrade).
    #[arg(short = 'u', long = "upgrade")]
    pub upgrade: bool,
    /// Something other than running the balancer.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ask a running sluice whether it is ready: exit 0 when its admin
    /// listener answers `GET /readyz` with 2xx, 1 otherwise (for container
    /// health checks and keepalived; the image has no curl).
    Healthcheck(HealthcheckArgs),
    /// Control a running sluice through its admin API: `status`, `drain`,
    /// `maint`, `ready`, `weight`, `activate`, `reload` (the admin address
    /// and token come from the configuration file).
    Ctl(crate::ctl::CtlArgs),
}

/// `sluice healthcheck` flags.
#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// Admin listener to ask [default: `admin.bind` of the configuration
    /// file, where 0.0.0.0 and [::] mean this host's loopback].
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// Path to ask (`/healthz` for liveness).
    #[arg(long, default_value = "/readyz")]
    pub path: String,
    /// Give up after this long (connect, send and answer together).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Print every problem of a configuration that failed to load.
fn report(conf: &std::path::Path, e: &ConfigError) {
    let mut err = std::io::stderr().lock();
    match e {
        ConfigError::Invalid(problems) => {
            for p in problems {
                let _ = writeln!(err, "{}: {p}", conf.display());
            }
            // Past the cap, the last entry says how many more there were.
            let count = match problems.len() {
                1 => "1 problem".to_string(),
                n if n > MAX_PROBLEMS => format!("more than {MAX_PROBLEMS} problems"),
                n => format!("{n} problems"),
            };
            let _ = writeln!(err, "{}: configuration invalid ({count})", conf.display());
        }
        other => {
            let _ = writeln!(err, "{other}");
        }
    }
}

/// `sluice healthcheck`: print the answer (or why there is none) and exit
/// 0 when it is 2xx.
fn healthcheck(conf: &std::path::Path, args: &HealthcheckArgs) -> ExitCode {
    let addr = match args.admin {
        Some(a) => a,
        None => match Config::load(conf) {
            Ok(c) => match c.admin {
                Some(admin) => healthcheck::dial_address(admin.bind),
                None => {
                    eprintln!(
                        "{}: no `admin` section, so nothing to ask; pass --admin ADDR",
                        conf.display()
                    );
                    return ExitCode::FAILURE;
                }
            },
            Err(e) => {
                report(conf, &e);
                eprintln!("cannot find the admin listener in the configuration; pass --admin ADDR");
                return ExitCode::FAILURE;
            }
        },
    };
    match healthcheck::probe(addr, &args.path, args.timeout) {
        Ok(answer) => {
            println!(
                "{addr}{}: {} {}",
                args.path, answer.status, answer.first_line
            );
            if answer.healthy() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            println!("unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Run sluice with parsed flags.
pub fn main(cli: Cli) -> ExitCode {
    if let Some(Command::Healthcheck(args)) = &cli.command {
        if cli.test || cli.daemon || cli.upgrade {
            eprintln!("error: -t, -d and -u cannot be used with `healthcheck`");
            return ExitCode::from(2);
        }
        return healthcheck(&cli.conf, args);
    }
    if let Some(Command::Ctl(args)) = &cli.command {
        if cli.test || cli.daemon || cli.upgrade {
            eprintln!("error: -t, -d and -u cannot be used with `ctl`");
            return ExitCode::from(2);
        }
        return match crate::ctl::run(&cli.conf, args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("sluice ctl: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::load(&cli.conf) {
        Ok(c) => c,
        Err(e) => {
            report(&cli.conf, &e);
            return ExitCode::FAILURE;
        }
    };
    if cli.test {
        for w in &config.warnings {
            eprintln!("{}: warning: {w}", cli.conf.display());
        }
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match server::run(
        config,
        RunOptions {
            config_path: cli.conf.clone(),
            daemon: cli.daemon,
            upgrade: cli.upgrade,
        },
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
