//! The C header and the Rust ABI crate describe the same layout.
use std::process::Command;

use kiln_tests::{c_source, compile_c_backend};

#[test]
fn c_header_layout_matches_rust() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("layout");
    let include =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/kiln-abi/include");
    let st = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Werror", "-I"])
        .arg(include)
        .arg(c_source("layout.c"))
        .arg("-o")
        .arg(&exe)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "the header's _Static_asserts failed or it does not compile"
    );
    let out = String::from_utf8(Command::new(&exe).output().unwrap().stdout).unwrap();
    let mut seen = 0;
    for (name, value) in kiln_abi::LAYOUT {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} not printed"));
        assert_eq!(
            line,
            format!("{name}={value}"),
            "C and Rust disagree on {name}"
        );
        seen += 1;
    }
    assert_eq!(seen, kiln_abi::LAYOUT.len());
    assert!(
        out.contains(&format!("magic={}", kiln_abi::KILN_ABI_MAGIC)),
        "magic differs: {out}"
    );
}

#[test]
fn c_backend_compiles_warning_free() {
    let dir = tempfile::tempdir().unwrap();
    compile_c_backend(
        &c_source("identity_backend.c"),
        &dir.path().join("libkiln_c.so"),
        &[],
    );
}
