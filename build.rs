//! Embeds the migrations of `sql/` in the binary, so the image needs no `sql/` folder at run
//! time and a migration can never be forgotten in a hand-kept list: every `sql/NNNN_*.sql`
//! file becomes one entry of `MIGRATIONS`, in file-name order.

use std::{env, fs, path::Path};

fn main() {
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
