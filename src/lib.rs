//! sluice: a Layer-4 TCP load balancer built on Pingora.
//!
//! # Architecture
//!
//! | module | owns |
//! | --- | --- |
//! | [`access_log`] | one line per connection at its end, written off the data path |
//! | [`cli`] | flags, `-t`, start-up, subcommands |
//! | [`edge`] | before a backend is picked: source allow/deny, per-source limits, the PROXY protocol |
//! | [`http`] | HTTP mode (`protocol: http`): a pingora-proxy service per listener, a backend per request, forwarded headers, routes |
//! | [`healthcheck`] | `sluice healthcheck`: one bounded `GET /readyz` for container health checks; the admin client under `ctl` |
//! | [`ctl`] | `sluice ctl`: drain, maint, ready, weights, reload and a status table from the command line |
//! | [`systemd`] | readiness, reloads and shutdown reported to systemd (`sd_notify`) |
//! | [`config`] | the YAML schema, defaults, validation with paths and line numbers |
//! | [`server`] | turning a config into pingora services and running them |
//! | [`traffic`] | the L4 service: listening sockets, accept loops, fd-exhaustion refusals |
//! | [`handover`] | carrying the listening sockets to `sluice -u` on SIGQUIT, any number of them |
//! | [`listener`] | one client: admission, backend connect with retries and passive health, relay |
//! | [`loops`] | detecting sluice proxying to itself |
//! | [`relay`] | moving bytes both ways with half-close, idle timeout and byte counting, in sluice or (the `sockmap` fast path) in the kernel |
//! | [`pool`] | backend state, serving set (active-active / active-passive), failover, picking |
//! | [`health`] | background health checks with rise/fall and DNS re-resolution |
//! | [`check`] | the check protocols: send/expect, HTTP, Redis, MySQL, PostgreSQL; backend roles |
//! | [`metrics`] | every Prometheus metric |
//! | [`admin`] | `/metrics`, `/healthz`, `/readyz`, `/api/v1/pools` |
//! | [`lifecycle`] | signals, draining on shutdown |
//! | [`state`] | what admin, signals and reloads share; readiness |
//! | [`sys`] | the lock policy, telling local exhaustion from a peer's failure, the fd limit |
//! | [`reload`] | applying a new configuration in place |
//! | [`tls`] | TLS termination, SNI routing and passthrough on listeners; TLS to backends |

pub mod access_log;
pub mod admin;
pub mod check;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod edge;
pub mod handover;
pub mod health;
pub mod healthcheck;
pub mod http;
pub mod lifecycle;
pub mod listener;
pub mod loops;
pub mod metrics;
pub mod pool;
pub mod relay;
pub mod reload;
pub mod server;
pub mod state;
pub mod sys;
pub mod systemd;
pub mod tls;
pub mod traffic;
