//! Interop harness: clients we did not write (Python `spiffe`, grpcio,
//! PyJWT; Node `@grpc/grpc-js`), installed pinned from their registries.
//!
//! `tests/interop/setup.sh` does the installing, once per machine: a Python
//! venv under `target/interop/venv` (pins in `tests/interop/requirements.txt`)
//! and a Node project under `target/interop/node` (`package.json` +
//! `package-lock.json`). It holds a lock file while it works, so parallel
//! test processes wait for one install, and is a no-op once the pins are
//! installed. `.ci/run` runs it before the tests so the install time falls
//! outside test timeouts. A missing `python3`/`node` is a test FAILURE with a
//! hint, never a skip.
//!
//! Use: call [`python`] / [`node`] first in a test (the first call of a
//! process may block while installing), then [`python_script`] /
//! [`node_script`] build a `tokio::process::Command` for a script in
//! `tests/interop/`, and [`output`] runs one with a deadline and returns its
//! stdout, failing the test with both streams when it does not succeed.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/interop/NAME`.
pub fn script_path(name: &str) -> PathBuf {
    repo().join("tests/interop").join(name)
}

/// Where the installs live: `$CARGO_TARGET_DIR/interop` or `target/interop`.
pub fn interop_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    target.join("interop")
}

/// Runs `setup.sh PART` once per process; panics with its output if it fails.
fn setup(part: &'static str, done: &'static OnceLock<Result<(), String>>) {
    let r = done.get_or_init(|| {
        let target = interop_dir()
            .parent()
            .expect("interop dir has a parent")
            .to_path_buf();
        let out = std::process::Command::new("bash")
            .arg(script_path("setup.sh"))
            .arg(part)
            .arg(&target)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run tests/interop/setup.sh: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "tests/interop/setup.sh {part} failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// The venv's Python interpreter, with every pinned package installed.
pub fn python() -> PathBuf {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    setup("python", &DONE);
    interop_dir().join("venv/bin/python")
}

/// The Node project (its `node_modules` holds the pinned packages).
pub fn node_project() -> PathBuf {
    interop_dir().join("node")
}

/// The `node` binary on PATH, after installing the Node project. Fails the
/// test (with a hint) when node or npm is absent.
pub fn node() -> PathBuf {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    setup("node", &DONE);
    which("node").unwrap_or_else(|| panic!("node is not on PATH: apt-get install nodejs npm"))
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// `python tests/interop/SCRIPT` (unbuffered output, the repo as cwd).
pub fn python_script(script: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(python());
    c.arg("-u")
        .arg(script_path(script))
        .current_dir(repo())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// `node tests/interop/SCRIPT` resolving modules from the Node project.
pub fn node_script(script: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(node());
    c.arg(script_path(script))
        .current_dir(repo())
        .env("NODE_PATH", node_project().join("node_modules"))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// Runs `cmd` to completion within `deadline`; returns stdout. Fails the
/// test, showing both streams, on a non-zero exit or a timeout.
pub async fn output(cmd: &mut tokio::process::Command, deadline: Duration) -> String {
    let what = format!("{:?}", cmd.as_std());
    let out = tokio::time::timeout(deadline, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {deadline:?}"))
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    stdout
}

/// Like [`output`] but returns (success, stdout, stderr) for tests that
/// expect the client to fail.
pub async fn try_output(
    cmd: &mut tokio::process::Command,
    deadline: Duration,
) -> (bool, String, String) {
    let what = format!("{:?}", cmd.as_std());
    let out = tokio::time::timeout(deadline, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {deadline:?}"))
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The JSON object a script prints on its last stdout line.
pub fn last_json(stdout: &str) -> serde_json::Value {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line in the script's output:\n{stdout}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// The SPIFFE Workload API proto (for grpcio-tools / proto-loader).
pub fn workload_proto() -> PathBuf {
    repo().join("proto/spiffe/workload.proto")
}
