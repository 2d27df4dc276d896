//! Names the git commit giftd is built from, for the `revision` label of `giftd_build_info`:
//! `GIFTD_REVISION` when the packager sets it (a build from a source tarball has no .git), else
//! `git rev-parse HEAD`, else "unknown". A build never fails for want of git.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=GIFTD_REVISION");
    let revision = match std::env::var("GIFTD_REVISION") {
        Ok(r) if !r.is_empty() => r,
        _ => {
            // HEAD's reflog changes with every commit and checkout (HEAD itself only when the
            // branch changes); both are named through git, which knows where a worktree keeps them.
            for path in ["HEAD", "logs/HEAD"] {
                if let Some(p) = git(&["rev-parse", "--git-path", path]) {
                    println!("cargo:rerun-if-changed={p}");
                }
            }
            git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=GIFTD_REVISION={revision}");
}
