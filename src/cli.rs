//! The command line: flags, `-t` (test the configuration) and start-up.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH, MAX_PROBLEMS};
use crate::server::{self, RunOptions};

/// sluice: a Layer-4 TCP load balancer built on Pingora.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
pub struct Cli {
    /// Configuration file.
    #[arg(short = 'c', long = "conf", value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
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

/// Run sluice with parsed flags.
pub fn main(cli: Cli) -> ExitCode {
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
