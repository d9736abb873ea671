//! The Debian packages built by `cross/check.sh`, inspected the way dpkg sees them.
//!
//! For each of `microfed_*_arm64.deb` and `microfed_*_amd64.deb` found in the package folder
//! (`MICROFED_DEB_DIR`, else `$CARGO_TARGET_DIR/debian`, else `target/debian`), checks:
//! - control fields (`dpkg-deb --field`): Package, Version, Architecture, Maintainer, Depends;
//! - contents (`dpkg-deb --contents`): the binary, the systemd unit, the sysusers entry, the config;
//! - control files (`dpkg-deb --control`): the config is a conffile, the postinst creates the user;
//! - the unit itself: Restart=on-failure, User=microfed, the ExecStart line, the hardening we rely on;
//! - the binary's ELF header (machine matches the package architecture) and the glibc versions it
//!   needs (read from `.gnu.version_r`), which must stay at or below 2.31 and within `Depends`.
//!
//! Without packages it prints "skipped: build them with cross/check.sh" and passes, so a plain
//! `cargo test` works on a machine without the cross tools; CI builds them first. When
//! `MICROFED_DEB_DIR` is set explicitly, missing packages are an error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, ensure};

/// JetPack 5 (Ubuntu 20.04) ships glibc 2.31: the newest symbol version the binary may need.
const GLIBC_FLOOR: (u32, u32) = (2, 31);

/// A Debian architecture we package for and the ELF `e_machine` its binaries must carry.
struct Arch {
    debian: &'static str,
    e_machine: u16,
}

const EM_AARCH64: u16 = 183;
const EM_X86_64: u16 = 62;

const ARCHES: [Arch; 2] = [
    Arch {
        debian: "arm64",
        e_machine: EM_AARCH64,
    },
    Arch {
        debian: "amd64",
        e_machine: EM_X86_64,
    },
];

#[test]
fn debian_packages_have_binary_unit_and_config() -> Result<()> {
    let explicit = std::env::var_os("MICROFED_DEB_DIR").map(PathBuf::from);
    let dir = explicit.clone().unwrap_or_else(default_deb_dir);
    let mut checked = 0;
    for arch in &ARCHES {
        match newest_deb(&dir, arch.debian)? {
            Some(deb) => {
                check_package(&deb, arch).with_context(|| format!("checking {}", deb.display()))?;
                println!("ok: {}", deb.display());
                checked += 1;
            }
            None => println!("no microfed_*_{}.deb in {}", arch.debian, dir.display()),
        }
    }
    if checked == 0 {
        ensure!(
            explicit.is_none(),
            "MICROFED_DEB_DIR={} holds no microfed .deb: the packaging step did not produce any",
            dir.display()
        );
        println!("skipped: build them with cross/check.sh");
    }
    Ok(())
}

/// `$CARGO_TARGET_DIR/debian`, where cross/check.sh writes by default, or the workspace's target/.
fn default_deb_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
        });
    target.join("debian")
}

/// The most recently written `microfed_<version>_<arch>.deb` in `dir` (older versions may linger).
fn newest_deb(dir: &Path, arch: &str) -> Result<Option<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let suffix = format!("_{arch}.deb");
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("microfed_") && name.ends_with(&suffix) {
            let modified = entry.metadata()?.modified()?;
            if best.as_ref().is_none_or(|(t, _)| modified > *t) {
                best = Some((modified, entry.path()));
            }
        }
    }
    Ok(best.map(|(_, p)| p))
}

fn check_package(deb: &Path, arch: &Arch) -> Result<()> {
    // ---- control fields
    let fields = control_fields(deb)?;
    let field = |k: &str| {
        fields
            .get(k)
            .map(String::as_str)
            .ok_or_else(|| anyhow!("no {k} field"))
    };
    ensure!(
        field("Package")? == "microfed",
        "Package is {:?}",
        field("Package")?
    );
    ensure!(
        field("Architecture")? == arch.debian,
        "Architecture is {:?}",
        field("Architecture")?
    );
    let version = field("Version")?;
    ensure!(
        version.starts_with(&format!("{}-", env!("CARGO_PKG_VERSION"))),
        "Version {version:?} is not the workspace version {} plus a Debian revision",
        env!("CARGO_PKG_VERSION")
    );
    let maintainer = field("Maintainer")?;
    ensure!(
        maintainer.contains(" <") && maintainer.ends_with('>') && maintainer.contains('@'),
        "Maintainer {maintainer:?} is not 'Name <address>'"
    );
    let depends = field("Depends")?;
    let libc_min = libc6_minimum(depends)?;
    ensure!(
        libc_min <= GLIBC_FLOOR,
        "Depends asks for libc6 >= {}.{}, above JetPack 5's glibc 2.31: {depends}",
        libc_min.0,
        libc_min.1
    );
    ensure!(
        depends.contains("systemd"),
        "Depends lacks systemd (for systemd-sysusers): {depends}"
    );
    let lower = depends.to_lowercase();
    ensure!(
        !lower.contains("cuda") && !lower.contains("nvidia"),
        "CUDA is loaded at run time and must stay optional, but Depends names it: {depends}"
    );

    // ---- contents as dpkg lists them: path -> mode string
    let contents = contents(deb)?;
    let mode = |p: &str| {
        contents
            .get(p)
            .map(String::as_str)
            .ok_or_else(|| anyhow!("{p} missing"))
    };
    ensure!(
        mode("/usr/bin/microfed")? == "-rwxr-xr-x",
        "/usr/bin/microfed is {}",
        mode("/usr/bin/microfed")?
    );
    let unit_path = [
        "/usr/lib/systemd/system/microfed.service",
        "/lib/systemd/system/microfed.service",
    ]
    .into_iter()
    .find(|p| contents.contains_key(*p))
    .ok_or_else(|| {
        anyhow!("no microfed.service under /usr/lib/systemd/system or /lib/systemd/system")
    })?;
    mode("/etc/microfed/agent.toml")?;
    mode("/usr/lib/sysusers.d/microfed.conf")?;
    ensure!(
        !contents.keys().any(|p| p.starts_with("/usr/lib/debug/")),
        "debug symbols belong in the -dbgsym package, not in the main one"
    );

    // ---- control files: conffiles and the user-creating postinst
    let tmp = tempfile::tempdir()?;
    let control = tmp.path().join("control");
    dpkg_deb(&["--control", path_str(deb)?, path_str(&control)?])?;
    let conffiles = read(&control.join("conffiles"))?;
    ensure!(
        conffiles
            .lines()
            .any(|l| l.trim() == "/etc/microfed/agent.toml"),
        "/etc/microfed/agent.toml is not a conffile; conffiles:\n{conffiles}"
    );
    let postinst = read(&control.join("postinst"))?;
    ensure!(
        postinst.contains("systemd-sysusers") && postinst.contains("microfed.conf"),
        "postinst does not create the microfed user with systemd-sysusers:\n{postinst}"
    );

    // ---- files themselves
    let root = tmp.path().join("root");
    dpkg_deb(&["--extract", path_str(deb)?, path_str(&root)?])?;
    check_unit(&read(&root.join(&unit_path[1..]))?)?;
    check_sysusers(&read(&root.join("usr/lib/sysusers.d/microfed.conf"))?)?;
    // The conffile is what `microfed agent --example-config` prints, and the agent accepts it as it
    // is (an operator uncommenting a section gets a section the agent knows).
    let config = read(&root.join("etc/microfed/agent.toml"))?;
    ensure!(
        config == microfed::cli::agent::EXAMPLE_CONFIG,
        "/etc/microfed/agent.toml differs from `microfed agent --example-config`"
    );
    let parsed: microfed::node::AgentConfig =
        toml::from_str(&config).context("/etc/microfed/agent.toml: the agent could not read it")?;
    parsed
        .validate()
        .context("/etc/microfed/agent.toml: the agent would refuse it")?;
    let uncommented = uncomment_sections(&config);
    let parsed: microfed::node::AgentConfig = toml::from_str(&uncommented)
        .context("/etc/microfed/agent.toml with its commented sections switched on")?;
    ensure!(
        parsed
            .federation
            .as_ref()
            .is_some_and(|f| f.fleet_models.is_some()),
        "uncommenting [federation] and [federation.fleet_models] should give both sections"
    );

    let binary =
        std::fs::read(root.join("usr/bin/microfed")).context("reading /usr/bin/microfed")?;
    let elf = Elf::parse(&binary).context("/usr/bin/microfed")?;
    ensure!(
        elf.e_machine == arch.e_machine,
        "/usr/bin/microfed has ELF machine {} but the package is {} (expected {})",
        elf.e_machine,
        arch.debian,
        arch.e_machine
    );
    let needed = elf
        .glibc_versions()
        .context("/usr/bin/microfed: reading .gnu.version_r")?;
    let max = needed
        .iter()
        .max()
        .copied()
        .ok_or_else(|| anyhow!("binary needs no GLIBC_ version"))?;
    ensure!(
        max <= GLIBC_FLOOR,
        "binary needs GLIBC_{}.{}, above the 2.31 floor",
        max.0,
        max.1
    );
    ensure!(
        max <= libc_min,
        "binary needs GLIBC_{}.{} but Depends promises only libc6 >= {}.{}",
        max.0,
        max.1,
        libc_min.0,
        libc_min.1
    );
    Ok(())
}

/// The unit's `[Service]` section must keep the promises cross/README.md makes.
fn check_unit(unit: &str) -> Result<()> {
    let service = ini_section(unit, "Service");
    let get = |k: &str| service.get(k).map(String::as_str).unwrap_or("");
    for (key, want) in [
        ("Restart", "on-failure"),
        ("User", "microfed"),
        ("Group", "microfed"),
        ("StateDirectory", "microfed"),
        ("ReadWritePaths", "/var/lib/microfed"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        // Issue 17: an input that slips past the limits kills the service, not the board.
        ("MemoryMax", "6G"),
    ] {
        ensure!(
            get(key) == want,
            "microfed.service: {key}={:?}, expected {want:?}",
            get(key)
        );
    }
    ensure!(
        get("ExecStart") == "/usr/bin/microfed agent --config /etc/microfed/agent.toml",
        "microfed.service: ExecStart={:?}",
        get("ExecStart")
    );
    for key in ["PrivateDevices", "MemoryDenyWriteExecute"] {
        ensure!(
            !service.contains_key(key),
            "microfed.service sets {key}, which breaks CUDA on the board"
        );
    }
    ensure!(
        ini_section(unit, "Install")
            .get("WantedBy")
            .map(String::as_str)
            == Some("multi-user.target"),
        "microfed.service: [Install] WantedBy=multi-user.target missing"
    );
    Ok(())
}

fn check_sysusers(conf: &str) -> Result<()> {
    let lines: Vec<Vec<&str>> = conf
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect())
        .collect();
    ensure!(
        lines
            .iter()
            .any(|f| f.len() >= 2 && f[0] == "u" && f[1] == "microfed"),
        "sysusers entry creates no user 'microfed':\n{conf}"
    );
    Ok(())
}

/// `key=value` lines of one `[section]` of a systemd unit (comments and blank lines skipped).
fn ini_section(text: &str, section: &str) -> BTreeMap<String, String> {
    let header = format!("[{section}]");
    let mut inside = false;
    let mut out = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == header;
        } else if inside
            && !line.starts_with('#')
            && !line.starts_with(';')
            && let Some((k, v)) = line.split_once('=')
        {
            out.insert(k.trim().to_owned(), v.trim().to_owned());
        }
    }
    out
}

/// The `(major, minor)` of `libc6 (>= X.Y…)` in a Depends field.
fn libc6_minimum(depends: &str) -> Result<(u32, u32)> {
    let clause = depends
        .split(',')
        .map(str::trim)
        .find(|c| c.starts_with("libc6 ") || *c == "libc6")
        .ok_or_else(|| anyhow!("Depends has no libc6: {depends}"))?;
    let version = clause
        .split_once("(>=")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(v, _)| v.trim())
        .ok_or_else(|| anyhow!("libc6 without a '(>= version)': {clause}"))?;
    parse_version(version).ok_or_else(|| anyhow!("libc6 version {version:?} is not X.Y"))
}

/// "2.31" or "2.31-0ubuntu9" -> (2, 31).
fn parse_version(v: &str) -> Option<(u32, u32)> {
    let mut parts = v.split(['.', '-', '+', '~']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn control_fields(deb: &Path) -> Result<BTreeMap<String, String>> {
    let keys = [
        "Package",
        "Version",
        "Architecture",
        "Maintainer",
        "Depends",
    ];
    let mut args = vec!["--field", path_str(deb)?];
    args.extend(keys);
    let out = dpkg_deb(&args)?;
    let mut fields = BTreeMap::new();
    for line in out.lines() {
        if let Some((k, v)) = line.split_once(": ") {
            fields.insert(k.to_owned(), v.trim().to_owned());
        }
    }
    Ok(fields)
}

/// `dpkg-deb --contents`: absolute path -> mode string (`-rwxr-xr-x`), directories included.
fn contents(deb: &Path) -> Result<BTreeMap<String, String>> {
    let out = dpkg_deb(&["--contents", path_str(deb)?])?;
    let mut map = BTreeMap::new();
    for line in out.lines() {
        // -rwxr-xr-x 0/0  1774952 2026-11-27 00:00 ./usr/bin/microfed
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() >= 6 {
            let path = fields[5].trim_start_matches('.').trim_end_matches('/');
            map.insert(
                if path.is_empty() {
                    "/".into()
                } else {
                    path.to_owned()
                },
                fields[0].to_owned(),
            );
        }
    }
    Ok(map)
}

fn dpkg_deb(args: &[&str]) -> Result<String> {
    let out = Command::new("dpkg-deb")
        .args(args)
        .output()
        .context("running dpkg-deb (Debian package dpkg) to inspect the packages")?;
    ensure!(
        out.status.success(),
        "dpkg-deb {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).context("dpkg-deb printed non-UTF-8")
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", p.display()))
}

/// Just enough of a little-endian ELF64 file to read its machine and its glibc version needs.
struct Elf<'a> {
    bytes: &'a [u8],
    e_machine: u16,
}

const SHT_GNU_VERNEED: u32 = 0x6fff_fffe;

impl<'a> Elf<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self> {
        ensure!(
            bytes.get(..4) == Some(b"\x7fELF".as_slice()),
            "not an ELF file"
        );
        ensure!(bytes.get(4) == Some(&2), "not a 64-bit ELF file");
        ensure!(bytes.get(5) == Some(&1), "not a little-endian ELF file");
        let e_machine = u16_at(bytes, 18)?;
        Ok(Elf { bytes, e_machine })
    }

    /// Section header `i`: (type, offset, size, link, info).
    fn section(&self, i: usize) -> Result<(u32, usize, usize, usize, usize)> {
        let shoff = usize::try_from(u64_at(self.bytes, 0x28)?)?;
        let shentsize = usize::from(u16_at(self.bytes, 0x3a)?);
        let base = shoff + i * shentsize;
        Ok((
            u32_at(self.bytes, base + 4)?,
            usize::try_from(u64_at(self.bytes, base + 24)?)?,
            usize::try_from(u64_at(self.bytes, base + 32)?)?,
            usize::try_from(u32_at(self.bytes, base + 40)?)?,
            usize::try_from(u32_at(self.bytes, base + 44)?)?,
        ))
    }

    /// Every `GLIBC_X.Y` named in the version-needs section (`readelf -V` shows the same).
    fn glibc_versions(&self) -> Result<Vec<(u32, u32)>> {
        let shnum = usize::from(u16_at(self.bytes, 0x3c)?);
        let mut versions = Vec::new();
        for i in 0..shnum {
            let (kind, offset, _, link, count) = self.section(i)?;
            if kind != SHT_GNU_VERNEED {
                continue;
            }
            let (_, strtab, strsize, _, _) = self.section(link)?;
            let mut need = offset;
            for _ in 0..count {
                let aux_count = usize::from(u16_at(self.bytes, need + 2)?);
                let mut aux = need + usize::try_from(u32_at(self.bytes, need + 8)?)?;
                for _ in 0..aux_count {
                    let name_off = usize::try_from(u32_at(self.bytes, aux + 8)?)?;
                    ensure!(
                        name_off < strsize,
                        "version name offset {name_off} outside .dynstr"
                    );
                    let name = c_str(self.bytes, strtab + name_off)?;
                    if let Some(v) = name.strip_prefix("GLIBC_").and_then(parse_version) {
                        versions.push(v);
                    }
                    aux += usize::try_from(u32_at(self.bytes, aux + 12)?)?;
                }
                need += usize::try_from(u32_at(self.bytes, need + 12)?)?;
            }
        }
        Ok(versions)
    }
}

fn slice(b: &[u8], at: usize, n: usize) -> Result<&[u8]> {
    b.get(at..at + n)
        .ok_or_else(|| anyhow!("ELF truncated: {n} bytes at {at} past its end {}", b.len()))
}
fn u16_at(b: &[u8], at: usize) -> Result<u16> {
    Ok(u16::from_le_bytes(slice(b, at, 2)?.try_into()?))
}
fn u32_at(b: &[u8], at: usize) -> Result<u32> {
    Ok(u32::from_le_bytes(slice(b, at, 4)?.try_into()?))
}
fn u64_at(b: &[u8], at: usize) -> Result<u64> {
    Ok(u64::from_le_bytes(slice(b, at, 8)?.try_into()?))
}
fn c_str(b: &[u8], at: usize) -> Result<&str> {
    let rest = b
        .get(at..)
        .ok_or_else(|| anyhow!("string at {at} past the end"))?;
    let end = rest
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| anyhow!("unterminated string at {at}"))?;
    Ok(std::str::from_utf8(&rest[..end])?)
}

#[test]
fn helpers_read_depends_and_units() -> Result<()> {
    assert_eq!(
        libc6_minimum("libc6 (>= 2.31), systemd | systemd-sysusers")?,
        (2, 31)
    );
    assert_eq!(libc6_minimum("systemd, libc6 (>= 2.35-0ubuntu3)")?, (2, 35));
    assert!(libc6_minimum("libc6").is_err());
    assert!(libc6_minimum("libc6-dev (>= 2.31)").is_err());
    let unit = "[Unit]\nUser=nobody\n[Service]\n# User=root\nUser = microfed\nRestart=on-failure\n";
    let service = ini_section(unit, "Service");
    assert_eq!(service.get("User").map(String::as_str), Some("microfed"));
    assert_eq!(service.len(), 2);
    assert!(
        Elf::parse(b"\x7fELF\x01\x01").is_err(),
        "a 32-bit ELF header was accepted"
    );
    assert!(
        Elf::parse(b"\x7fELF\x02\x01\x01").is_err(),
        "a truncated header was accepted"
    );
    Ok(())
}

/// The ELF reader on this very test binary (host glibc) agrees with binutils' readelf.
#[test]
fn elf_reader_matches_readelf_on_this_test() -> Result<()> {
    let exe = std::env::current_exe()?;
    let bytes = std::fs::read(&exe)?;
    let elf = Elf::parse(&bytes)?;
    let mut ours = elf.glibc_versions()?;
    ours.sort();
    ours.dedup();
    ensure!(
        !ours.is_empty(),
        "found no GLIBC_ version in {}",
        exe.display()
    );
    if cfg!(target_arch = "x86_64") {
        ensure!(
            elf.e_machine == EM_X86_64,
            "e_machine {} on x86_64",
            elf.e_machine
        );
    }
    let Ok(out) = Command::new("readelf")
        .arg("-W")
        .arg("-V")
        .arg(&exe)
        .output()
    else {
        println!("readelf not found: compared nothing");
        return Ok(());
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut theirs: Vec<(u32, u32)> = text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("GLIBC_").and_then(parse_version))
        .collect();
    theirs.sort();
    theirs.dedup();
    ensure!(ours == theirs, "ours {ours:?} != readelf's {theirs:?}");
    Ok(())
}

/// The conffile with its commented-out sections switched on: every line `# [section]` or
/// `# key = value` after the first commented section header loses its `# `.
fn uncomment_sections(text: &str) -> String {
    let mut on = false;
    let mut out = String::new();
    for line in text.lines() {
        let body = line.strip_prefix("# ");
        if let Some(b) = body
            && b.starts_with('[')
        {
            on = true;
        }
        match body {
            Some(b) if on && (b.starts_with('[') || b.contains(" = ")) => out.push_str(b),
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}
