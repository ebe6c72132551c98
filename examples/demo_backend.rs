//! A tiny backend for the demo (`make run`) and the container compose file.
//!
//! `demo_backend NAME ADDR` listens on ADDR; for each connection it waits for
//! the first bytes (an HTTP request from curl, or a line from nc), answers with
//! an HTTP response naming itself, and closes.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(name), Some(addr)) = (args.next(), args.next()) else {
        eprintln!(
            "usage: demo_backend NAME ADDR   (for example: demo_backend app1 127.0.0.1:9001)"
        );
        std::process::exit(2);
    };
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("demo_backend {name} listening on {addr}");
    loop {
        let (mut sock, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let name = name.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            // Health checks connect and close without sending anything.
            match tokio::time::timeout(Duration::from_secs(30), sock.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let body = format!("hello from {name} (you are {peer})\n");
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\nx-served-by: {name}\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(reply.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
