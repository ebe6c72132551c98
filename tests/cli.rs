//! The command line: `-t` on every shipped and every broken configuration,
//! `--version`, and start-up failures that must be loud.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// `sluice -t -c FILE` through `sh` with `setup` run first (a `ulimit`);
/// `None` when it has not exited after `limit` (it is then killed).
fn test_config_within(setup: &str, file: &Path, limit: Duration) -> Option<(i32, String)> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("{setup}\nexec \"$0\" -t -c \"$1\""))
        .arg(env!("CARGO_BIN_EXE_sluice"))
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    Some((status.code().unwrap_or(-1), stderr))
}

/// A pool whose redis check reads its password from `file`.
fn with_password_file(file: &Path) -> String {
    format!(
        "listeners: {{ web: {{ bind: 127.0.0.1:8080, pool: app }} }}\n\
         pools: {{ app: {{ health_check: {{ kind: redis, password_file: '{}' }}, backends: [127.0.0.1:9001] }} }}\n",
        file.display()
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
    let certs = tempfile::tempdir().unwrap();
    for f in files {
        // A file with TLS names /etc/sluice/tls: -t reads the certificates
        // there, so it runs on test ones the script makes.
        let text = std::fs::read_to_string(&f).unwrap();
        let checked = if text.contains("/etc/sluice/tls") {
            let dir = certs.path().join("tls");
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/demo-certs.sh");
            let made = Command::new(script).arg(&dir).output().unwrap();
            assert!(made.status.success(), "{made:?}");
            let copy = certs.path().join(f.file_name().unwrap());
            std::fs::write(
                &copy,
                text.replace("/etc/sluice/tls", dir.to_str().unwrap()),
            )
            .unwrap();
            copy
        } else {
            f.clone()
        };
        let (code, stdout, stderr) = sluice(&["-t", "-c", checked.to_str().unwrap()]);
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

#[test]
fn a_config_path_that_is_no_regular_file_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.yaml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for (file, what) in [
        (fifo.as_path(), "a FIFO"),
        (Path::new("/dev/zero"), "a character device"),
        (dir.path(), "a directory"),
    ] {
        // A FIFO with no writer blocked `-t` (and a reload) forever.
        let (code, stderr) = test_config_within("", file, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("-t on {} did not return", file.display()));
        assert_eq!(code, 1, "{stderr}");
        assert!(
            stderr.contains(&format!(
                "cannot read {}: not a regular file ({what})",
                file.display()
            )),
            "{stderr}"
        );
    }
}

#[test]
fn an_oversized_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.yaml");
    // A comment: valid YAML of any length.
    let mut text = String::from("# ");
    text.push_str(&"x".repeat(5 << 20));
    std::fs::write(&big, text).unwrap();
    let (code, stderr) = test_config_within("", &big, Duration::from_secs(20)).unwrap();
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot read {}: ", big.display()))
            && stderr.contains("is larger than the limit of 4 MiB"),
        "{stderr}"
    );
}

#[test]
fn a_password_file_that_is_no_small_regular_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pw");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let config = dir.path().join("sluice.yaml");
    for (file, what) in [
        (fifo.as_path(), "a FIFO"),
        (Path::new("/dev/zero"), "a character device"),
    ] {
        std::fs::write(&config, with_password_file(file)).unwrap();
        // The memory cap turns the unbounded read of /dev/zero into a quick failure.
        let (code, stderr) =
            test_config_within("ulimit -v 1500000", &config, Duration::from_secs(20))
                .unwrap_or_else(|| panic!("-t with {} did not return", file.display()));
        assert_eq!(code, 1, "{stderr}");
        assert!(
            stderr.contains(&format!(
                "pools.app.health_check.password_file: cannot read `{}`: not a regular file ({what})",
                file.display()
            )),
            "{stderr}"
        );
    }
}

#[test]
fn a_flood_of_problems_is_cut_short() {
    // 200,000 unknown keys: every one was listed, at length.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("many.yaml");
    let mut text = String::from(
        "listeners: { web: { bind: 127.0.0.1:8080, pool: app } }\n\
         pools: { app: { backends: [127.0.0.1:9001] } }\nserver:\n",
    );
    for i in 0..200_000 {
        text.push_str(&format!("  k{i}: 1\n"));
    }
    std::fs::write(&file, text).unwrap();
    let started = Instant::now();
    let (code, stderr) = test_config_within("", &file, Duration::from_secs(60)).unwrap();
    let took = started.elapsed();
    assert_eq!(code, 1);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 102, "{}", &stderr[..stderr.len().min(2000)]);
    assert!(
        lines[0].contains("server.k0: unknown key `k0`"),
        "{}",
        lines[0]
    );
    assert!(
        lines[100].ends_with("and 199900 more problems (only the first 100 are listed)"),
        "{}",
        lines[100]
    );
    assert!(
        lines[101].ends_with("configuration invalid (more than 100 problems)"),
        "{}",
        lines[101]
    );
    println!("-t on 200,000 unknown keys took {took:?}");
}
