//! The command line: `-t` on every shipped and every broken configuration,
//! `--version`, and start-up failures that must be loud.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

fn sluice(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        // conf/mysql-primary-replica.yaml names it; -t reads it like a start would.
        .env("SLUICE_MYSQL_MONITOR_PASSWORD", "not-a-real-password")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_shipped_configuration_is_valid() {
    let files = yaml_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("conf"));
    assert!(files.len() >= 4, "conf/ has the example files: {files:?}");
    for f in files {
        let (code, stdout, stderr) = sluice(&["-t", "-c", f.to_str().unwrap()]);
        assert_eq!(code, 0, "{}: {stderr}", f.display());
        assert_eq!(stdout, "configuration OK\n", "{}", f.display());
    }
}

#[test]
fn every_broken_configuration_is_rejected_with_each_problem_named() {
    let files = yaml_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid"));
    assert!(files.len() >= 8);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(
            !expected.is_empty(),
            "{} has no `# expect:` lines",
            f.display()
        );
        let (code, stdout, stderr) = sluice(&["-t", "-c", f.to_str().unwrap()]);
        assert_eq!(code, 1, "{}: {stdout}{stderr}", f.display());
        assert!(!stdout.contains("configuration OK"));
        for e in &expected {
            assert!(
                stderr.contains(e),
                "{}: expected `{e}` in:\n{stderr}",
                f.display()
            );
        }
        assert!(
            stderr.contains(&format!(
                "configuration invalid ({} problem",
                expected.len()
            )),
            "{}: one problem per `# expect:` line:\n{stderr}",
            f.display()
        );
    }
}

#[test]
fn a_missing_file_is_an_error() {
    let (code, _, stderr) = sluice(&["-t", "-c", "/nonexistent/sluice.yaml"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot read /nonexistent/sluice.yaml"),
        "{stderr}"
    );
}

#[test]
fn version_is_printed() {
    let (code, stdout, _) = sluice(&["--version"]);
    assert_eq!(code, 0);
    assert_eq!(stdout, format!("sluice {}\n", env!("CARGO_PKG_VERSION")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_stops_start_up_with_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let s = Sluice::spawn(&front_to_app(port, "", "backends: ['127.0.0.1:1']"));
    let status = s.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(1));
    // The log is read on another thread; it may trail the exit.
    s.wait_log(&format!(
        "cannot listen on 127.0.0.1:{port} (listeners.front.bind): Address already in use"
    ))
    .await;
}
