//! Dependency advisories, offline: every package in Cargo.lock against a snapshot of the RustSec
//! advisory database (`../shared/advisory-db`, or `MICROFED_ADVISORY_DB`; see its SNAPSHOT.md).
//!
//! Fails on any advisory that affects a locked version — vulnerabilities and the informational
//! kinds (unmaintained, unsound, notice) alike — unless `advisories-accepted.toml` at the workspace
//! root accepts it with a reason. An accepted entry that no longer matches anything fails too, so
//! the file never outlives the reason. Withdrawn advisories are skipped. Run by tests/run.sh.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use semver::{Version, VersionReq};
use serde::Deserialize;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn db() -> PathBuf {
    std::env::var_os("MICROFED_ADVISORY_DB")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/advisory-db"))
}

#[derive(Deserialize)]
struct Lock {
    package: Vec<LockPackage>,
}

#[derive(Deserialize)]
struct LockPackage {
    name: String,
    version: String,
}

#[derive(Deserialize)]
struct AdvisoryFile {
    advisory: Advisory,
    #[serde(default)]
    versions: Versions,
}

#[derive(Deserialize)]
struct Advisory {
    id: String,
    package: String,
    #[serde(default)]
    informational: Option<String>,
    #[serde(default)]
    withdrawn: Option<toml::Value>,
}

#[derive(Deserialize, Default)]
struct Versions {
    #[serde(default)]
    patched: Vec<String>,
    #[serde(default)]
    unaffected: Vec<String>,
}

#[derive(Deserialize)]
struct Accepted {
    #[serde(default)]
    accepted: Vec<AcceptedEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AcceptedEntry {
    id: String,
    package: String,
    reason: String,
}

/// The TOML front matter of an advisory (```toml … ``` at the top of the .md file).
fn front_matter(text: &str) -> Option<&str> {
    let rest = text.trim_start().strip_prefix("```toml")?;
    Some(&rest[..rest.find("```")?])
}

fn req(text: &str) -> Result<VersionReq> {
    VersionReq::parse(text.trim()).with_context(|| format!("version range {text:?}"))
}

/// True when `version` is in none of the patched or unaffected ranges.
fn affected(v: &Versions, version: &Version) -> Result<bool> {
    for r in v.patched.iter().chain(&v.unaffected) {
        if req(r)?.matches(version) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// (advisory id, package, version, kind) for every advisory that affects a locked package.
fn findings() -> Result<Vec<(String, String, String, String)>> {
    let db = db();
    ensure!(
        db.join("crates").is_dir(),
        "no advisory database at {} (set MICROFED_ADVISORY_DB to a RustSec snapshot)",
        db.display()
    );
    let lock: Lock = toml::from_str(&std::fs::read_to_string(root().join("Cargo.lock"))?)?;
    let mut locked: BTreeMap<&str, Vec<Version>> = BTreeMap::new();
    for p in &lock.package {
        locked
            .entry(&p.name)
            .or_default()
            .push(Version::parse(&p.version).with_context(|| format!("{} {}", p.name, p.version))?);
    }
    let mut out = Vec::new();
    for (name, versions) in &locked {
        let dir = db.join("crates").join(name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let path = e?.path();
            if path.extension().is_none_or(|x| x != "md") {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            let Some(front) = front_matter(&text) else {
                bail!("{}: no TOML front matter", path.display());
            };
            let a: AdvisoryFile =
                toml::from_str(front).with_context(|| format!("{}", path.display()))?;
            if a.advisory.withdrawn.is_some() || a.advisory.package != *name {
                continue;
            }
            for v in versions {
                if affected(&a.versions, v).with_context(|| format!("{}", path.display()))? {
                    out.push((
                        a.advisory.id.clone(),
                        name.to_string(),
                        v.to_string(),
                        a.advisory
                            .informational
                            .clone()
                            .unwrap_or_else(|| "vulnerability".into()),
                    ));
                }
            }
        }
    }
    Ok(out)
}

#[test]
fn no_advisory_affects_the_lock_file_unless_accepted_with_a_reason() -> Result<()> {
    if std::env::var_os("MICROFED_SKIP_ADVISORIES").is_some() {
        eprintln!("MICROFED_SKIP_ADVISORIES is set: advisory check skipped");
        return Ok(());
    }
    let accepted: Accepted = toml::from_str(&std::fs::read_to_string(
        root().join("advisories-accepted.toml"),
    )?)
    .context("advisories-accepted.toml")?;
    for a in &accepted.accepted {
        ensure!(
            a.reason.trim().len() >= 20,
            "advisories-accepted.toml: {} needs a real reason",
            a.id
        );
    }
    let found = findings()?;
    let mut problems = Vec::new();
    for (id, package, version, kind) in &found {
        if !accepted
            .accepted
            .iter()
            .any(|a| &a.id == id && &a.package == package)
        {
            problems.push(format!("{id} ({kind}): {package} {version}"));
        }
    }
    for a in &accepted.accepted {
        if !found
            .iter()
            .any(|(id, p, ..)| *id == a.id && *p == a.package)
        {
            problems.push(format!(
                "{} ({}) is accepted in advisories-accepted.toml but no longer affects Cargo.lock: remove it",
                a.id, a.package
            ));
        }
    }
    ensure!(
        problems.is_empty(),
        "dependency advisories (RustSec snapshot at {}):\n  {}\nupgrade, replace, or accept with a reason in advisories-accepted.toml",
        db().display(),
        problems.join("\n  ")
    );
    Ok(())
}

/// The checker itself: a known advisory is found for an affected version and not for a patched one.
#[test]
fn the_checker_reads_ranges_as_rustsec_means_them() -> Result<()> {
    let v = Versions {
        patched: vec![">= 1.2.3".into(), "^0.9.5".into()],
        unaffected: vec!["< 0.5".into()],
    };
    assert!(affected(&v, &Version::parse("1.2.2")?)?);
    assert!(!affected(&v, &Version::parse("1.2.3")?)?);
    assert!(!affected(&v, &Version::parse("0.9.7")?)?);
    assert!(affected(&v, &Version::parse("0.9.4")?)?);
    assert!(!affected(&v, &Version::parse("0.4.0")?)?);
    let none = Versions::default();
    assert!(affected(&none, &Version::parse("2.2.0")?)?);
    assert_eq!(
        front_matter("```toml\n[advisory]\nid = \"X\"\n```\n# t"),
        Some("\n[advisory]\nid = \"X\"\n")
    );
    Ok(())
}
