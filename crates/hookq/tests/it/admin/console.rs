//! The console in a real browser: tests/console/console.test.mjs drives
//! headless Chromium (playwright-core) against a real `hookq up` on this
//! test's prefix. Screenshots go to this test's scratch directory, or to
//! `HOOKQ_SCREENSHOTS` when set (`HOOKQ_SCREENSHOTS=docs/console` refreshes
//! the README's), so that a test run leaves the tree as it was. Skipped, loudly,
//! only with HOOKQ_SKIP_BROWSER=1; .ci/run installs chromium, node and the
//! npm packages.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use hookq::config::{HandlerKind, TargetUrl};

use super::{TOKEN, admin_env};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_browser_lists_shows_and_moves_back() {
    if std::env::var("HOOKQ_SKIP_BROWSER").as_deref() == Ok("1") {
        eprintln!(
            "\n*** SKIPPED the browser test of the admin console (HOOKQ_SKIP_BROWSER=1) ***\n"
        );
        return;
    }
    // Screenshot paths (HOOKQ_SCREENSHOTS=docs/console) are the repository's.
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "no {chromium}: apt-get install chromium (.ci/run does), or HOOKQ_SKIP_BROWSER=1"
    );
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "run `npm ci` in tests/console (.ci/run does), or HOOKQ_SKIP_BROWSER=1"
    );
    let mut env = admin_env("console");
    env.settings.worker.handler = HandlerKind::Http;
    // The script starts its own target and points hookq at it.
    env.settings.worker.target = Some(
        TargetUrl::parse("http://127.0.0.1:9/unused")
            .unwrap()
            .into(),
    );
    env.settings.retry.max_attempts = 2;
    env.settings.retry.inline_attempts_set = Some(1);
    let config = env.config_file().expect("a config file");
    let shots = std::env::var_os("HOOKQ_SCREENSHOTS")
        .map(|d| root.join(d))
        .unwrap_or_else(|| env.dir().join("screenshots"));
    let run = tokio::process::Command::new("node")
        .arg("console.test.mjs")
        .current_dir(&dir)
        .env("HOOKQ_BIN", env!("CARGO_BIN_EXE_hookq"))
        .env("HOOKQ_CONFIG", &config)
        .env("HOOKQ_TOKEN", TOKEN)
        .env("SCREENSHOTS", &shots)
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the browser test ends within 4 minutes")
        .expect("node runs (apt-get install nodejs npm; .ci/run does)");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!("{stdout}{stderr}");
    assert!(
        out.status.success(),
        "the browser test failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}
