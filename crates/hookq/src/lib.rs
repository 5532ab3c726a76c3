//! hookq: webhooks off the public internet fast and safely, each processed once.
//!
//! The flow, and the module that owns each step:
//! 1. [`ingress`]: HTTP in; verify the signature, derive the idempotency key,
//!    publish with confirm, answer 202.
//! 2. [`broker`]: the only module that speaks AMQP (lapin): connection
//!    supervision over the cluster's nodes, topology, publish, consume.
//! 3. [`worker`]: consume, [`dedup`] (LRU then SQLite), deliver through
//!    [`delivery`], decide with [`retry`], then ack, delay or dead-letter.
//!    Each delivery passes its target's gate in [`targets`] (limits for the
//!    whole system, adaptive concurrency, the breaker, pauses).
//! 4. [`dead_letters`]: reading, counting and moving dead letters (`P.dead`),
//!    for the command line ([`cli`]) and the admin API ([`admin`]) alike.
//!
//! Around them: [`config`] (settings, typed and validated once), [`message`]
//! (the envelope on the broker), [`system`] (a running hookq as one handle),
//! [`events`] (what happened, for [`metrics`], tests and tools), [`http`]
//! (serving, health and metrics routes).
//!
//! Not here: `hookq bench` and `hookq simulate` (the `hookq-bench` crate,
//! binaries `hookq-bench` and `hookq-simulate` that the `hookq` binary runs)
//! and the tests' sandbox and fake target (`hookq-testkit`).

pub mod admin;
pub mod broker;
pub mod cli;
pub mod config;
pub mod dead_letters;
pub mod dedup;
pub mod delivery;
pub mod events;
pub mod http;
pub mod ingress;
pub mod message;
mod metrics;
pub mod retry;
pub mod shutdown;
pub mod system;
pub mod targets;
pub mod telemetry;
pub mod worker;

/// The invariants ARCHITECTURE.md states about who imports what, checked
/// on the source: a crate boundary would say it better, a test says it now.
#[cfg(test)]
mod invariants {
    use std::path::{Path, PathBuf};

    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// Files under `src/` (relative, with `/`) whose code names `needle`.
    fn naming(needle: &str) -> Vec<String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&root, &mut files);
        let mut out: Vec<String> = files
            .iter()
            // This file holds the needles themselves.
            .filter(|p| !p.ends_with("lib.rs"))
            .filter(|p| {
                std::fs::read_to_string(p)
                    .unwrap()
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("//"))
                    .any(|l| l.contains(needle))
            })
            .map(|p| {
                p.strip_prefix(&root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/")
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn only_broker_speaks_amqp() {
        for f in naming("lapin::") {
            assert!(f.starts_with("broker/"), "{f} names lapin");
        }
        for f in naming("amq_protocol::") {
            assert!(f.starts_with("broker/"), "{f} names amq_protocol");
        }
    }

    #[test]
    fn only_the_dedup_store_speaks_sqlite() {
        for f in naming("rusqlite") {
            assert!(f.starts_with("dedup/store/"), "{f} names rusqlite");
        }
    }

    #[test]
    fn config_imports_nothing_from_the_parts() {
        for part in [
            "crate::broker",
            "crate::worker",
            "crate::ingress",
            "crate::dedup",
            "crate::delivery",
            "crate::admin",
            "crate::dead_letters",
            "crate::system",
            "crate::cli",
        ] {
            for f in naming(part) {
                assert!(!f.starts_with("config/"), "{f} imports {part}");
            }
        }
    }

    #[test]
    fn no_domain_module_imports_the_command_line() {
        for f in naming("crate::cli") {
            assert!(
                f.starts_with("cli/") || f == "main.rs",
                "{f} imports the command line"
            );
        }
    }

    #[test]
    fn retry_policy_does_no_io_and_reads_no_clock() {
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/retry.rs"))
                .unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap();
        for io in [
            "tokio::",
            "std::fs",
            "std::net",
            "SystemTime::now",
            "Instant::now",
        ] {
            assert!(!code.contains(io), "retry.rs uses {io}");
        }
    }
}
