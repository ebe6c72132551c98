//! Real TLS peers for the tests: NGINX as an HTTPS backend (run in the
//! foreground from a temporary directory, no system service), `openssl
//! s_client`, `curl`, and a plain HTTP backend in the test.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::common::{reserve_port, wait_until};

/// An NGINX server in its own directory; killed on drop.
pub struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
    /// Where it listens (HTTPS).
    pub addr: SocketAddr,
}

impl Nginx {
    /// NGINX serving HTTPS on a free port with `cert`/`key`; `extra` goes
    /// into the server block. `location /` answers `body` (NGINX variables
    /// in it are filled in); `/big.bin` is a file of `big` bytes.
    pub async fn start(cert: &Path, key: &Path, body: &str, extra: &str, big: usize) -> Nginx {
        Nginx::serve(Some((cert, key)), "ssl", body, extra, big).await
    }

    /// The same with `listen … {flags}` (`ssl http2`; `http2` alone is
    /// HTTP/2 by prior knowledge, h2c), over TLS only with `tls`.
    pub async fn serve(
        tls: Option<(&Path, &Path)>,
        flags: &str,
        body: &str,
        extra: &str,
        big: usize,
    ) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        std::fs::write(
            dir.path().join("big.bin"),
            (0..big).map(|i| (i % 251) as u8).collect::<Vec<u8>>(),
        )
        .unwrap();
        let port = reserve_port();
        let certificate = tls.map_or(String::new(), |(cert, key)| {
            format!(
                "  ssl_certificate {};\n  ssl_certificate_key {};\n",
                cert.display(),
                key.display()
            )
        });
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\nevents {{ worker_connections 256; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
             default_type text/plain;\n\
             server {{\n  listen 127.0.0.1:{port} {flags};\n{certificate}\
             {extra}\n  location = /big.bin {{ root {d}; }}\n  location / {{ return 200 \"{body}\\n\"; }}\n }}\n}}\n",
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (Debian package nginx-light) runs");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let n = Nginx { child, dir, addr };
        wait_until("nginx listening", || async {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await;
        n
    }

    /// Its error log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP/1.1 server in the test that answers every request with `body`.
pub async fn http_backend(body: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// What a client program printed, and whether it succeeded.
#[derive(Debug)]
pub struct Run {
    /// Exit status 0.
    pub ok: bool,
    /// Standard output.
    pub out: String,
    /// Standard error.
    pub err: String,
}

/// Run `program args` with no input, for at most 30 s.
pub async fn run(program: &str, args: &[String]) -> Run {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{program} {args:?} did not finish in 30 s"))
    .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    Run {
        ok: output.status.success(),
        out: String::from_utf8_lossy(&output.stdout).into_owned(),
        err: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `openssl s_client` to 127.0.0.1:`port`, sending `name` as SNI (none
/// without), verifying against `ca`, reading until the server closes.
pub async fn s_client(port: u16, name: Option<&str>, ca: &Path, extra: &[&str]) -> Run {
    let mut args: Vec<String> = ["s_client", "-connect"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(format!("127.0.0.1:{port}"));
    match name {
        Some(n) => args.extend(["-servername".to_string(), n.to_string()]),
        None => args.push("-noservername".to_string()),
    }
    args.extend(["-CAfile".to_string(), ca.display().to_string()]);
    args.extend(["-verify_return_error", "-ign_eof"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    run("openssl", &args).await
}

/// The subject line s_client printed for the server's certificate.
pub fn subject(run: &Run) -> Option<String> {
    run.out
        .lines()
        .find(|l| l.starts_with("subject="))
        .map(|l| l.trim_start_matches("subject=").trim().to_string())
}

/// `curl` to `https://name:port/path`, with `name` resolved to 127.0.0.1.
pub async fn curl(name: &str, port: u16, path: &str, ca: &Path, extra: &[&str]) -> Run {
    let mut args: Vec<String> = vec![
        "-sS".into(),
        "--max-time".into(),
        "20".into(),
        "--cacert".into(),
        ca.display().to_string(),
        "--resolve".into(),
        format!("{name}:{port}:127.0.0.1"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(format!("https://{name}:{port}{path}"));
    run("curl", &args).await
}
