//! The `send_expect` check: write bytes and wait for answers, step by step.

use tokio::io::AsyncWriteExt;

use super::{Budget, CheckStream, ProbeError, Role, TEXT_CAP, Target, connect, preview, read_some};
use crate::config::{Expect, Step};

/// Run `steps` in order over one connection.
pub(super) async fn probe(
    steps: &[Step],
    addr: Target<'_>,
    budget: &Budget,
) -> Result<Option<Role>, ProbeError> {
    let mut stream = connect(addr, budget).await?;
    let mut buf = Vec::new();
    for step in steps {
        match step {
            Step::Send(bytes) => stream.write_all(bytes).await.map_err(ProbeError::Io)?,
            Step::Expect(expect) => {
                wait_for(&mut stream, &mut buf, expect).await?;
                // Each expect sees only what came after the previous match.
                buf.clear();
            }
        }
    }
    Ok(None)
}

/// Read into `buf` until `expect` is met.
async fn wait_for(
    stream: &mut CheckStream,
    buf: &mut Vec<u8>,
    expect: &Expect,
) -> Result<(), ProbeError> {
    loop {
        match verdict(buf, expect) {
            Verdict::Met => return Ok(()),
            Verdict::Missed => {
                return Err(ProbeError::Failed(format!(
                    "expected {}, got: {}",
                    describe(expect),
                    preview(buf)
                )));
            }
            Verdict::Undecided => {}
        }
        if buf.len() >= TEXT_CAP {
            return Err(ProbeError::Failed(format!(
                "expected {} within {} KiB, got: {}",
                describe(expect),
                TEXT_CAP / 1024,
                preview(buf)
            )));
        }
        if read_some(stream, buf, TEXT_CAP).await? == 0 {
            return Err(ProbeError::Failed(format!(
                "connection closed before {} was received, got: {}",
                describe(expect),
                preview(buf)
            )));
        }
    }
}

/// Where a wait stands.
enum Verdict {
    Met,
    /// Can no longer be met, whatever comes next.
    Missed,
    Undecided,
}

fn verdict(buf: &[u8], expect: &Expect) -> Verdict {
    match expect {
        Expect::Pattern(p) if p.is_match(buf) => Verdict::Met,
        Expect::Pattern(_) => Verdict::Undecided,
        Expect::Bytes(want) if buf.starts_with(want) => Verdict::Met,
        // A wrong first byte already decides: no need to wait for the rest.
        Expect::Bytes(want) if !want.starts_with(buf) => Verdict::Missed,
        Expect::Bytes(_) => Verdict::Undecided,
    }
}

/// `expect` as written in messages: `/re/` or quoted, escaped bytes.
fn describe(expect: &Expect) -> String {
    match expect {
        Expect::Pattern(p) => format!("/{}/", p.as_str()),
        Expect::Bytes(b) => preview(b),
    }
}
