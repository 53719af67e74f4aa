//! What a build says about itself: `order-api --version` (also `version`, `-V`) prints the
//! version of Cargo.toml and the git commit the binary was built from.

use std::process::Command;

/// The three spellings print `order-api VERSION (commit COMMIT)` and exit 0, without reading
/// the configuration (an unusable setting does not stop them).
#[test]
fn version_prints_the_version_and_the_commit() {
    for flag in ["--version", "version", "-V"] {
        let output = Command::new(env!("CARGO_BIN_EXE_order-api"))
            .arg(flag)
            .env("API_PORT", "not a port")
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap();
        assert!(output.status.success(), "{flag}: {output:?}");
        let printed = String::from_utf8(output.stdout).unwrap();
        assert_eq!(printed, format!("order-api {} (commit {})\n", order_api::VERSION, order_api::GIT_COMMIT));
    }
    assert_eq!(order_api::VERSION, env!("CARGO_PKG_VERSION"));
}

/// Built from a git checkout, the commit is HEAD's full hash; `unknown` only without git.
#[test]
fn the_commit_is_heads_when_built_from_git() {
    let head = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8(output.stdout).unwrap().trim().to_owned());
    match head {
        // The override the image build uses wins over git (set for the build, so for this run).
        Some(_) if std::env::var_os("ORDER_API_GIT_COMMIT").is_some() => {}
        Some(head) => assert_eq!(order_api::GIT_COMMIT, head),
        None => eprintln!("not a git checkout: the commit is {}", order_api::GIT_COMMIT),
    }
    let commit = order_api::GIT_COMMIT;
    assert!(commit == "unknown" || (commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit())), "{commit}");
}
