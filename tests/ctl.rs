//! `sluice ctl` against a real sluice whose admin API needs a token: the
//! address and token come from the configuration file, each action does
//! what the API does, and refusals say why with exit code 1.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::*;

const TOKEN: &str = "ctl-test-token-0123456789abcdef";

/// Run `sluice ARGS` off the async runtime: exit code, stdout, stderr.
async fn sluice(args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(&args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

async fn admin_state(s: &Sluice, addr: SocketAddr) -> (String, u64) {
    let pools = s.pools().await;
    let b = pools["pools"]["app"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == addr.to_string())
        .unwrap()
        .clone();
    (
        b["admin_state"].as_str().unwrap().to_string(),
        b["weight"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn ctl_drains_maintains_weighs_readies_and_reloads_with_the_configured_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_path = dir.path().join("token");
    std::fs::write(&token_path, format!("{TOKEN}\n")).unwrap();
    let one = Backend::start("one", Behavior::Name).await;
    let two = Backend::start("two", Behavior::Name).await;
    let port = reserve_port();
    let yaml = front_to_app(port, "", &format!("backends: [{}, {}]", one.addr, two.addr)).replace(
        "admin: { bind: '{admin}' }",
        &format!(
            "admin: {{ bind: '{{admin}}', token_file: '{}' }}",
            token_path.display()
        ),
    );
    let s = Sluice::start(&yaml).await;
    let conf = s.config_path.to_str().unwrap().to_string();
    let (a, b) = (one.addr.to_string(), two.addr.to_string());

    // status: one line per backend, in a table.
    let (code, out, err) = sluice(&["-c", &conf, "ctl", "status"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("POOL"), "{out}");
    assert_eq!(lines.len(), 3, "{out}");
    assert!(out.contains(&a) && out.contains(&b), "{out}");
    assert!(
        lines[1].contains(" up ") && lines[1].contains("ready"),
        "{out}"
    );

    // drain, with the token read from admin.token_file.
    let (code, out, err) = sluice(&["-c", &conf, "ctl", "drain", "app", &a]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("{a}: admin_state drained")), "{out}");
    assert_eq!(admin_state(&s, one.addr).await.0, "drained");
    // No new connection reaches it.
    let got = tally(format!("127.0.0.1:{port}").parse().unwrap(), 10).await;
    assert_eq!(got.get("two"), Some(&10), "{got:?}");

    let (code, out, err) = sluice(&["-c", &conf, "ctl", "weight", "app", &b, "3"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(admin_state(&s, two.addr).await.1, 3);

    let (code, out, err) = sluice(&["-c", &conf, "ctl", "maint", "app", &b, "--grace", "5s"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(admin_state(&s, two.addr).await.0, "maint");

    let (code, out, err) = sluice(&["-c", &conf, "ctl", "ready", "app", &a]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(admin_state(&s, one.addr).await.0, "ready");

    let (code, out, err) = sluice(&["-c", &conf, "ctl", "reload"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("reloaded: "), "{out}");
    // The operator's states survive the reload.
    assert_eq!(admin_state(&s, two.addr).await.0, "maint");

    // Refusals: exit 1 and the API's reason.
    let (code, _, err) = sluice(&["-c", &conf, "ctl", "drain", "app", "127.0.0.1:1"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");
    let (code, _, err) = sluice(&["-c", &conf, "ctl", "drain", "nopool", &a]).await;
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");
    let (code, _, err) = sluice(&["-c", &conf, "ctl", "weight", "app", &a, "0"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("400"), "{err}");
    let (code, _, err) = sluice(&["-c", &conf, "ctl", "status", "nopool"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no pool `nopool`"), "{err}");

    // A wrong token (by flag, with --admin): 401, nothing changes.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-token-at-all-0000").unwrap();
    let admin = s.admin.to_string();
    let (code, _, err) = sluice(&[
        "ctl",
        "--admin",
        &admin,
        "--token-file",
        wrong.to_str().unwrap(),
        "drain",
        "app",
        &b,
    ])
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
    assert_eq!(admin_state(&s, two.addr).await.0, "maint");
    // The token never shows in what ctl prints.
    assert!(!err.contains("not-the-token"), "{err}");
}

#[tokio::test]
async fn ctl_says_what_to_pass_when_it_cannot_find_sluice() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("sluice.yaml");
    std::fs::write(
        &conf,
        "listeners: { web: { bind: 127.0.0.1:1, pool: app } }\npools: { app: { backends: [127.0.0.1:2] } }\n",
    )
    .unwrap();
    let (code, _, err) = sluice(&["-c", conf.to_str().unwrap(), "ctl", "status"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("no `admin` section") && err.contains("--admin"),
        "{err}"
    );

    let missing = dir.path().join("missing.yaml");
    let (code, _, err) = sluice(&["-c", missing.to_str().unwrap(), "ctl", "status"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("pass --admin ADDR"), "{err}");

    // Nothing listening: the connect error, quickly.
    let port = reserve_port();
    let (code, _, err) = sluice(&["ctl", "--admin", &format!("127.0.0.1:{port}"), "status"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("cannot connect"), "{err}");

    let (code, _, err) = sluice(&["-t", "ctl", "status"]).await;
    assert_eq!(code, 2, "{err}");
}
