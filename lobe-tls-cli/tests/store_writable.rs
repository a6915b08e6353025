//! A store the user cannot write is refused at start, in one line naming `--store` and
//! the user, by `serve` with managed names and by `renew`, instead of failing at the
//! first renewal weeks later. As root (CI), the binary runs as `nobody` through
//! util-linux's `setpriv`, since root writes anywhere; otherwise the store is made
//! read-only.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use lobe_tls_tests::cli::assert_one_line_error;

/// `lobe-tls ARGS` as a user that cannot write `store` (created here, empty).
fn as_a_user_who_cannot_write(store: &std::path::Path, args: &[&str]) -> std::process::Output {
    let bin = env!("CARGO_BIN_EXE_lobe-tls");
    let mut cmd = if rustix::process::geteuid().is_root() {
        std::fs::set_permissions(store, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            bin,
        ]);
        cmd
    } else {
        std::fs::set_permissions(store, std::fs::Permissions::from_mode(0o555)).unwrap();
        Command::new(bin)
    };
    cmd.arg("--store")
        .arg(store)
        .args(args)
        .env_remove("LOBE_TLS_STORE")
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn serve_with_managed_names_refuses_a_store_it_cannot_write() {
    // Under /tmp, which every user can reach (a test's own target dir may not be).
    let store = tempfile::tempdir_in("/tmp").unwrap();
    let out = as_a_user_who_cannot_write(
        store.path(),
        &[
            "serve",
            "-d",
            "app.example.com",
            "--upstream",
            "127.0.0.1:9",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
    );
    let store = store.path().display().to_string();
    assert_one_line_error(&out, &[&format!("--store {store}"), "cannot write", "uid"]);
}

#[test]
fn renew_refuses_a_store_it_cannot_write() {
    let store = tempfile::tempdir_in("/tmp").unwrap();
    let out = as_a_user_who_cannot_write(store.path(), &["renew"]);
    let store = store.path().display().to_string();
    assert_one_line_error(&out, &[&format!("--store {store}"), "cannot write", "uid"]);
}
