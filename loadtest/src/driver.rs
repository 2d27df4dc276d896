//! The driver: starts giftd on a fresh data directory and stops it the way an operator would
//! (SIGTERM, then a clean exit 0), so a benchmark also checks that a loaded server drains and stops.

use anyhow::{anyhow, bail, Context, Result};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

/// giftd recovers an empty directory in milliseconds; this only bounds a server that hangs.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// giftd's shutdown grace is 10 s by default, plus the final WAL sync.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of giftd's log shown when it fails.
const LOG_TAIL_LINES: usize = 20;

pub struct Server {
    child: Child,
    /// Kept open until giftd exits: if it were closed, a later write by giftd to stdout would fail.
    _stdout: BufReader<ChildStdout>,
    pub addr: String,
    pub durability: String,
    log: PathBuf,
    /// Removed (with the data) when the server is dropped.
    _dir: tempfile::TempDir,
}

/// giftd is looked for next to giftload (cargo builds both into the same directory), unless
/// GIFTD_BIN names it.
fn giftd_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("GIFTD_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating giftload's own executable")?;
    let bin = exe.parent().ok_or_else(|| anyhow!("giftload's executable has no directory"))?.join("giftd");
    if !bin.exists() {
        bail!("{} not found: build it (cargo build --release --bin giftd) or set GIFTD_BIN", bin.display());
    }
    Ok(bin)
}

impl Server {
    pub async fn spawn(durability: Option<&str>) -> Result<Server> {
        let bin = giftd_bin()?;
        let dir = tempfile::Builder::new().prefix("giftload-").tempdir().context("creating a temp dir")?;
        let log = dir.path().join("giftd.log");
        let log_file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("--data-dir").arg(dir.path().join("data")).args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ]);
        if let Some(d) = durability {
            cmd.args(["--durability", d]);
        }
        // giftd logs to stderr; a file keeps giftload's own output readable and is shown on failure.
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::from(log_file)).kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("giftd's stdout was not captured"))?;
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        let read = tokio::time::timeout(READY_TIMEOUT, stdout.read_line(&mut line)).await;
        let ready = match read {
            Ok(Ok(n)) if n > 0 => parse_ready(&line),
            Ok(Ok(_)) => Err(anyhow!("giftd exited before it was ready")),
            Ok(Err(e)) => Err(anyhow!("reading giftd's stdout: {e}")),
            Err(_) => Err(anyhow!("giftd was not ready after {READY_TIMEOUT:?}")),
        };
        let (addr, durability) = match ready {
            Ok(r) => r,
            Err(e) => {
                let _ = child.kill().await;
                return Err(anyhow!("{e:#}\n{}", log_tail(&log)));
            }
        };
        Ok(Server { child, _stdout: stdout, addr, durability, log, _dir: dir })
    }

    /// SIGTERM, then wait for exit status 0: a graceful stop is part of what a run checks.
    pub async fn stop(mut self) -> Result<()> {
        let pid = self.child.id().ok_or_else(|| anyhow!("giftd already exited"))?;
        // The `kill` command rather than libc: one process per run is not worth a dependency.
        let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
        if !status.success() {
            bail!("kill -TERM {pid} failed: {status}");
        }
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(s)) if s.success() => Ok(()),
            Ok(Ok(s)) => Err(anyhow!("giftd exited with {s} after SIGTERM\n{}", log_tail(&self.log))),
            Ok(Err(e)) => Err(anyhow!("waiting for giftd: {e}")),
            Err(_) => {
                let _ = self.child.kill().await;
                Err(anyhow!("giftd did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed\n{}", log_tail(&self.log)))
            }
        }
    }
}

/// `giftd ready listen=127.0.0.1:PORT metrics=127.0.0.1:PORT durability=sync`
fn parse_ready(line: &str) -> Result<(String, String)> {
    let mut words = line.split_whitespace();
    if (words.next(), words.next()) != (Some("giftd"), Some("ready")) {
        bail!("unexpected first line from giftd: {:?}", line.trim_end());
    }
    let (mut addr, mut durability) = (None, None);
    for w in words {
        if let Some(v) = w.strip_prefix("listen=") {
            addr = Some(v.to_string());
        } else if let Some(v) = w.strip_prefix("durability=") {
            durability = Some(v.to_string());
        }
    }
    match (addr, durability) {
        (Some(a), Some(d)) => Ok((a, d)),
        _ => bail!("giftd's ready line lacks listen= or durability=: {:?}", line.trim_end()),
    }
}

fn log_tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
    format!("giftd's log ends with:\n{tail}")
}

#[cfg(test)]
mod tests {
    use super::parse_ready;

    #[test]
    fn ready_line_parses() {
        let (a, d) =
            parse_ready("giftd ready listen=127.0.0.1:40001 metrics=127.0.0.1:40002 durability=relaxed\n").unwrap();
        assert_eq!((a.as_str(), d.as_str()), ("127.0.0.1:40001", "relaxed"));
        assert!(parse_ready("hello\n").is_err());
        assert!(parse_ready("giftd ready metrics=127.0.0.1:1\n").is_err());
    }
}
