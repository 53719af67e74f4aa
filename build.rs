//! Two things the binary carries from its build:
//! - the migrations of `sql/`, embedded so that the image needs no `sql/` folder at run time
//!   and a migration can never be forgotten in a hand-kept list: every `sql/NNNN_*.sql` file
//!   becomes one entry of `MIGRATIONS`, in file-name order;
//! - the git commit it was built from (`ORDER_API_GIT_COMMIT` at run time of this script), for
//!   `order-api --version` and the `order_api_build_info` series.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    embed_migrations();
    println!("cargo:rustc-env=ORDER_API_GIT_COMMIT={}", git_commit());
}

fn embed_migrations() {
    println!("cargo:rerun-if-changed=sql");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .expect("the sql/ folder must exist")
        .map(|entry| entry.expect("readable sql/ entry").file_name().into_string().expect("UTF-8 file name"))
        .filter(|name| name.ends_with(".sql") && name.starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    names.sort();

    let mut code = String::from(
        "/// Every migration of `sql/`, in the order they apply.\npub const MIGRATIONS: &[Migration] = &[\n",
    );
    for name in &names {
        let path = dir.join(name);
        code.push_str(&format!(
            "    Migration {{ name: {name:?}, sql: include_str!({path:?}) }},\n",
            path = path.display().to_string()
        ));
    }
    code.push_str("];\n");
    let out = Path::new(&env::var("OUT_DIR").unwrap()).join("migrations.rs");
    fs::write(out, code).expect("write migrations.rs");
}

/// The commit being built: `ORDER_API_GIT_COMMIT` when set (the image build, whose context
/// has no `.git`, passes its `REVISION` build argument so), else `git rev-parse HEAD`, else
/// `unknown` (a source tarball, or no git installed). A working tree with uncommitted changes
/// still reports its HEAD: telling them apart would mean rerunning this script on every edit.
fn git_commit() -> String {
    println!("cargo:rerun-if-env-changed=ORDER_API_GIT_COMMIT");
    if let Ok(commit) = env::var("ORDER_API_GIT_COMMIT")
        && !commit.trim().is_empty()
    {
        return commit.trim().to_owned();
    }
    // Rerun when HEAD moves: a new commit rewrites the branch's ref (loose, or packed after a
    // `git gc`), a checkout rewrites HEAD itself. In a worktree these live in different
    // folders, which `--git-path` resolves.
    for file in ["HEAD", "packed-refs"] {
        watch(git(&["rev-parse", "--git-path", file]));
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch(git(&["rev-parse", "--git-path", &branch]));
    }
    git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
}

/// `git ARGS` in the crate's folder: its trimmed output, or `None` if git is missing or fails.
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?.trim().to_owned();
    (output.status.success() && !text.is_empty()).then_some(text)
}

/// Reruns this script when `path` (relative to the crate's folder, or absolute) changes. Only
/// a file that exists: cargo takes a missing one as changed on every build.
fn watch(path: Option<String>) {
    let Some(path) = path else { return };
    let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
