//! A real giftd child process on ports chosen by the kernel, with its data in a temporary directory.
//!
//! Layout of the temporary directory: `data/` (the data dir given to giftd), `giftd.toml` (when a
//! configuration is given) and `giftd.log` (giftd's stderr, appended across restarts).

use giftd::client::Client;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long giftd may take to print its ready line (RocksDB recovery on a loaded machine).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long giftd may take to exit after SIGTERM (drain grace is 10 s by default).
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Giftd {
    dir: TempDir,
    config: Option<PathBuf>,
    child: Option<Child>,
    addr: String,
    metrics_addr: String,
    starts: u32,
    /// RLIMIT_FSIZE for the child, with SIGXFSZ ignored: a write past it fails with EFBIG.
    file_size_limit: Option<u64>,
    /// Environment variables for the child only (tests run in parallel in one process).
    env: Vec<(&'static str, &'static str)>,
}

impl Giftd {
    /// Starts giftd with the default configuration.
    pub fn start() -> Giftd {
        Giftd::start_with(None, &[])
    }

    /// Starts giftd with `toml` written to a configuration file and passed with `--config`.
    pub fn with_config(toml: &str) -> Giftd {
        Giftd::start_with(Some(toml), &[])
    }

    /// Starts giftd with these environment variables (and the configuration, if any).
    pub fn with_env(toml: Option<&str>, env: &[(&'static str, &'static str)]) -> Giftd {
        Giftd::start_with(toml, env)
    }

    fn start_with(toml: Option<&str>, env: &[(&'static str, &'static str)]) -> Giftd {
        let dir = tempfile::Builder::new().prefix("giftd-it-").tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
        let config = toml.map(|t| {
            let p = dir.path().join("giftd.toml");
            std::fs::write(&p, t).expect("write config");
            p
        });
        let mut g = Giftd {
            dir,
            config,
            child: None,
            addr: String::new(),
            metrics_addr: String::new(),
            starts: 0,
            file_size_limit: None,
            env: env.to_vec(),
        };
        g.spawn();
        g
    }

    /// Starts giftd unable to write any file past `bytes`: its WAL writes fail once the log grows
    /// that far, as they would on a full or failing disk.
    pub fn with_file_size_limit(bytes: u64) -> Giftd {
        let mut g = Giftd::start_with(None, &[]);
        g.kill9();
        g.file_size_limit = Some(bytes);
        g.spawn();
        g
    }

    /// The next start has no file size limit.
    pub fn lift_file_size_limit(&mut self) {
        self.file_size_limit = None;
    }

    /// Waits for giftd to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("giftd is running");
        wait_exit(&mut child, timeout).unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!("giftd did not exit within {timeout:?}; log tail:\n{}", self.log_tail(40))
        })
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "giftd is already running");
        let log = OpenOptions::new().create(true).append(true).open(self.log_path()).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_giftd"));
        cmd.arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .envs(self.env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        if let Some(limit) = self.file_size_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec only async-signal-safe calls (signal, setrlimit) run.
            unsafe {
                cmd.pre_exec(move || {
                    // An ignored SIGXFSZ survives exec, so the write fails instead of killing giftd.
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    let lim = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn giftd");
        self.starts += 1;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        // Sends the first line, then keeps draining stdout until giftd exits.
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines.by_ref() {}
        });
        let line = match rx.recv_timeout(READY_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                panic!(
                    "giftd (start #{}) did not get ready within {READY_TIMEOUT:?} (exit: {status:?}); log tail:\n{}",
                    self.starts,
                    self.log_tail(40)
                );
            }
        };
        let field = |name: &str| -> String {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or_else(|| panic!("ready line {line:?} lacks {name}"))
                .to_string()
        };
        assert!(line.starts_with("giftd ready "), "unexpected first stdout line: {line:?}");
        self.addr = field("listen=");
        self.metrics_addr = field("metrics=");
        assert!(self.addr.starts_with("127.0.0.1:"), "{line}");
        assert!(line.contains("durability=sync"), "{line}");
        self.child = Some(child);
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn metrics_addr(&self) -> &str {
        &self.metrics_addr
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("giftd.log")
    }

    /// Everything giftd wrote to stderr so far, across restarts.
    pub fn log(&self) -> Vec<u8> {
        std::fs::read(self.log_path()).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = String::from_utf8_lossy(&self.log()).into_owned();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("giftd is running").id() as i32
    }

    /// A connected, handshaken client.
    pub async fn client(&self) -> Client {
        crate::timed("connect", Client::connect(&self.addr))
            .await
            .unwrap_or_else(|e| panic!("connect {}: {e:#}", self.addr))
    }

    /// SIGKILL: no drain, no final sync.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("giftd is running");
        child.kill().expect("kill -9 giftd");
        let _ = child.wait();
    }

    /// Sends `sig` and waits for giftd to exit.
    pub fn signal_and_wait(&mut self, sig: i32) -> ExitStatus {
        let mut child = self.child.take().expect("giftd is running");
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        let rc = unsafe { libc::kill(child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill({sig}) failed");
        wait_exit(&mut child, EXIT_TIMEOUT).unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!("giftd did not exit within {EXIT_TIMEOUT:?} of signal {sig}; log tail:\n{}", self.log_tail(40))
        })
    }

    /// Sends `sig` and returns at once; [`Giftd::wait_exit`] then waits for the exit.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({sig}) failed");
    }

    /// A connected, handshaken client, authenticated as `credentials`.
    pub async fn client_as(&self, credentials: &giftd::client::Credentials) -> Client {
        crate::timed("connect", Client::connect_as(&self.addr, Some(credentials)))
            .await
            .unwrap_or_else(|e| panic!("connect {} as {credentials:?}: {e:#}", self.addr))
    }

    pub fn sigterm(&mut self) -> ExitStatus {
        self.signal_and_wait(libc::SIGTERM)
    }

    /// SIGTERM, and a clean exit (status 0); otherwise fails with the status and giftd's log.
    pub fn stop_cleanly(&mut self) {
        let status = self.sigterm();
        assert!(status.success(), "giftd exited with {status:?} after SIGTERM; log tail:\n{}", self.log_tail(40));
    }

    /// Starts giftd again on the same data directory (killing it first if it still runs).
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.kill9();
        }
        self.spawn();
    }
}

impl Drop for Giftd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs giftd with `toml` as its configuration, expecting it to exit on its own without getting
/// ready. Returns its exit status, stdout and stderr.
pub fn run_to_exit(toml: &str) -> (ExitStatus, String, String) {
    let dir = tempfile::Builder::new().prefix("giftd-it-").tempdir().expect("temp dir");
    let config = dir.path().join("giftd.toml");
    std::fs::write(&config, toml).expect("write config");
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_giftd"))
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(File::create(&out).expect("stdout file")))
        .stderr(Stdio::from(File::create(&err).expect("stderr file")))
        .spawn()
        .expect("spawn giftd");
    let status = wait_exit(&mut child, READY_TIMEOUT).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("giftd with config {toml:?} kept running")
    });
    let text = |p: &Path| String::from_utf8_lossy(&read_all(p)).into_owned();
    (status, text(&out), text(&err))
}

/// Waits (bounded) for a child to exit, polling its status.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read_dir {}: {e}", d.display())) {
            let e = e.expect("dir entry");
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

/// Opens `path` for reading, for tests that scan files.
pub fn read_all(path: &Path) -> Vec<u8> {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut v = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut v).expect("read");
    v
}
