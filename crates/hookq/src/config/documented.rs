//! The configuration keys users read about are the keys hookq takes: the
//! commented default file, the README's table and the contract's table list
//! the same set, and the loader knows each.

use super::tests::{env, file};
use super::*;

/// The keys of a Markdown table's rows (`| section.key |`, `| a.b / c |`,
/// `| sources.NAME.x / y |`), each `a / b` pair as two keys.
fn table_keys(markdown: &str) -> std::collections::BTreeSet<String> {
    let mut keys = std::collections::BTreeSet::new();
    for line in markdown.lines() {
        let Some(cell) = line.strip_prefix("| ").and_then(|l| l.split(" |").next()) else {
            continue;
        };
        let mut parts = cell.split(" / ");
        let Some(first) = parts.next() else { continue };
        let valid = |k: &str| {
            let k = k.replace("NAME", "name");
            k.bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.')
                && [
                    "amqp.", "ingress.", "worker.", "retry.", "dedup.", "admin.", "sources.",
                    "targets.",
                ]
                .iter()
                .any(|s| k.starts_with(s))
        };
        if !valid(first) {
            continue;
        }
        keys.insert(first.to_string());
        let prefix = &first[..first.rfind('.').map_or(0, |i| i + 1)];
        for more in parts {
            keys.insert(format!("{prefix}{}", more.trim()));
        }
    }
    keys
}

/// The keys `config/default.toml` lists, set or commented out
/// (`# key = value`), under their section (`[sources]`'s commented example
/// as `sources.NAME.key`).
fn default_file_keys(toml: &str) -> std::collections::BTreeSet<String> {
    let mut keys = std::collections::BTreeSet::new();
    let mut section = String::new();
    for line in toml.lines() {
        let l = line.trim_start_matches('#').trim();
        if let Some(s) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            section = if s.starts_with("sources.") {
                "sources.NAME".into()
            } else if s.starts_with("targets.") {
                "targets.NAME".into()
            } else {
                s.to_string()
            };
            continue;
        }
        let Some((key, _)) = l.split_once(" = ") else {
            continue;
        };
        let key = key.trim();
        if !section.is_empty()
            && !key.is_empty()
            && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        {
            keys.insert(format!("{section}.{key}"));
        }
    }
    keys
}

/// Adding a key means adding it everywhere a user reads about keys: the
/// commented default file, the README's table and the contract's table name
/// the same set, and every key the loader takes.
#[test]
fn the_default_file_readme_and_contract_list_the_same_keys() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let in_file = default_file_keys(&read("config/default.toml"));
    let readme = table_keys(&read("README.md"));
    let contract = table_keys(&read("docs/contract.md"));
    assert_eq!(in_file, readme, "config/default.toml against README.md");
    assert_eq!(
        in_file, contract,
        "config/default.toml against docs/contract.md"
    );
    // And the loader takes each of them (a value of the wrong type names the
    // key; an unknown key names itself).
    for key in &in_file {
        let (section, field) = key.rsplit_once('.').unwrap();
        let section = section.replace("NAME", "x");
        let text = format!("[{section}]\n{field} = {{}}\n");
        let f = file(&text);
        let e = load_with_env(Some(f.path()), env(&[]), Role::Other).unwrap_err();
        assert!(
            !e.problem.contains("unknown field"),
            "{key} is listed but not a key: {e}"
        );
    }
}
