//! Builds the eBPF object (`balancer-ebpf`) and leaves it in `OUT_DIR` for `dataplane.rs` to embed.
//!
//! The kernel side is compiled by Debian's rustc, whose prebuilt `core` for bpfel-unknown-none
//! spares us nightly and `-Z build-std`; user space keeps using whatever rustc cargo runs with.
//! So this is a nested cargo with a scrubbed environment, not a build-dependency.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

const EBPF_PACKAGE: &str = "balancer-ebpf";
const BPF_TARGET: &str = "bpfel-unknown-none";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const FIX: &str = "run `cargo xtask setup`";

fn main() -> ExitCode {
    match build() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            // `cargo::error=` shows exactly this line and fails the build without the
            // "failed to run custom build command" noise a panic would add.
            println!("cargo::error={message}");
            ExitCode::SUCCESS
        }
    }
}

fn build() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    let workspace = manifest_dir
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", manifest_dir.display()))?;
    let ebpf_dir = workspace.join(EBPF_PACKAGE);

    for watched in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join("Cargo.lock"),
        workspace.join("balancer-common/src"),
        workspace.join("balancer-common/Cargo.toml"),
    ] {
        println!("cargo::rerun-if-changed={}", watched.display());
    }

    let linker = find_bpf_linker()?;
    println!("cargo::rerun-if-changed={}", linker.display());
    check_debian_rustc()?;

    // One target dir outside any profile's directory, so debug and release host builds (and
    // clippy, tests) share a single eBPF build instead of each compiling it again. Its own
    // directory also keeps the nested cargo off the outer cargo's lock.
    let target_dir = workspace.join("target").join("bpf");
    // aya-ebpf picks helper layouts by the architecture the object will be loaded on, which is
    // the one user space is built for.
    let bpf_target_arch = env_var("CARGO_CFG_TARGET_ARCH")?;
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{bpf_target_arch}\""),
        // bpf-linker turns DWARF into BTF; without both, aya cannot load BTF maps and the
        // verifier log has no source lines.
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
    ]
    .join("\x1f");

    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(cargo);
    scrub_env(&mut command);
    command
        .current_dir(&ebpf_dir)
        .env("RUSTC", DEBIAN_RUSTC)
        // Debian ships a stable rustc; aya-ebpf's `#[classifier]` et al. need a few unstable
        // features, which this enables for the eBPF crate only.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env("PATH", path_with(linker.parent()))
        .args(["build", "--release", "--locked", "--target", BPF_TARGET])
        .arg("--target-dir")
        .arg(&target_dir);

    let output = command
        .output()
        .map_err(|error| format!("cannot start cargo for {EBPF_PACKAGE}: {error}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        // The compiler's diagnostics are the useful part; show them as warnings, then fail.
        for line in stderr.lines() {
            println!("cargo::warning={line}");
        }
        return Err(format!(
            "building {EBPF_PACKAGE} for {BPF_TARGET} failed ({}); its cargo output is above",
            output.status
        ));
    }
    for line in stderr.lines().filter(|line| line.contains("warning")) {
        println!("cargo::warning={EBPF_PACKAGE}: {line}");
    }

    let object = target_dir
        .join(BPF_TARGET)
        .join("release")
        .join(EBPF_PACKAGE);
    let embedded = out_dir.join(EBPF_PACKAGE);
    fs::copy(&object, &embedded).map_err(|error| {
        format!(
            "copying {} to {}: {error}",
            object.display(),
            embedded.display()
        )
    })?;
    Ok(())
}

/// Keeps the outer build's settings (its rustc, wrappers, flags, target, target dir, profile and
/// the variables cargo sets for this build script) out of the nested eBPF build.
fn scrub_env(command: &mut Command) {
    const BUILD_SCRIPT_VARS: &[&str] = &[
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_LINKER",
        "RUSTDOC",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "TARGET",
        "HOST",
        "OUT_DIR",
        "PROFILE",
        "OPT_LEVEL",
        "DEBUG",
        "NUM_JOBS",
        "RUSTUP_TOOLCHAIN",
    ];
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        // CARGO_HOME keeps the registry cache shared; CARGO_MAKEFLAGS lets the nested cargo
        // take jobserver tokens from the outer one instead of oversubscribing the CPUs.
        let keep = matches!(key, "CARGO_HOME" | "CARGO_MAKEFLAGS");
        if !keep && (key.starts_with("CARGO") || BUILD_SCRIPT_VARS.contains(&key)) {
            command.env_remove(key);
        }
    }
}

/// bpf-linker from PATH, else from cargo's bin directory (where `cargo install` puts it, and
/// which is not always on a build script's PATH).
fn find_bpf_linker() -> Result<PathBuf, String> {
    let from_path = env::var_os("PATH")
        .map(|path| env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")));
    from_path
        .into_iter()
        .chain(cargo_home.map(|home| home.join("bin")))
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| format!("bpf-linker not found: {FIX}"))
}

/// Debian's rustc and its prebuilt `core` for the BPF target (package libstd-rust-web-dev-bpf).
fn check_debian_rustc() -> Result<(), String> {
    if !Path::new(DEBIAN_RUSTC).is_file() {
        return Err(format!("{DEBIAN_RUSTC} not found: {FIX}"));
    }
    let output = Command::new(DEBIAN_RUSTC)
        .args(["--print", "sysroot"])
        .env_remove("RUSTC_BOOTSTRAP")
        .output()
        .map_err(|error| format!("cannot run {DEBIAN_RUSTC}: {error}: {FIX}"))?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let lib_dir = sysroot.join("lib/rustlib").join(BPF_TARGET).join("lib");
    let has_core = fs::read_dir(&lib_dir)
        .map(|entries| {
            entries.filter_map(Result::ok).any(|entry| {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                name.starts_with("libcore-") && name.ends_with(".rlib")
            })
        })
        .unwrap_or(false);
    if !has_core {
        return Err(format!(
            "no core library for {BPF_TARGET} in {}: {FIX}",
            lib_dir.display()
        ));
    }
    Ok(())
}

fn path_with(dir: Option<&Path>) -> OsString {
    let mut dirs: Vec<PathBuf> = dir.map(Path::to_path_buf).into_iter().collect();
    if let Some(path) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&path));
    }
    env::join_paths(dirs).unwrap_or_default()
}

fn env_var(key: &str) -> Result<String, String> {
    env::var(key).map_err(|_| format!("{key} is not set; is this running under cargo?"))
}
