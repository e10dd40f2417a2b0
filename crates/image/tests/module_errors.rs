//! What `import_wasm` tells a client about a file that is not a module, or a name that is not
//! one: never the file's text (the server reads any file a client names), always the value
//! that is wrong.

#![allow(clippy::unwrap_used)] // a panic is how a test fails

use std::fs;

use warren_image::{ImageError, ImageStore};

/// The error with its causes, as the CLI prints it.
fn chain(e: &ImageError) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    out
}

#[test]
fn a_file_that_is_not_a_module_is_never_quoted() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&tmp.path().join("store")).unwrap();
    let cases = [
        (
            "secret.wasm",
            "TOP-SECRET password=x\n",
            "no \\0asm header, and not WAT text",
        ),
        (
            "name.wat",
            ";; notes\n(module (func (call $secret_token_xyz)))",
            "invalid WAT text: line 2, column 21: unknown func: failed to find name",
        ),
        (
            "comment.wat",
            "(; TOP-SECRET ;) (module",
            "invalid WAT text: line 1, column 25",
        ),
    ];
    for (file, text, want) in cases {
        let path = tmp.path().join(file);
        fs::write(&path, text).unwrap();
        let err = store.import_wasm(&path, "x").unwrap_err();
        assert!(matches!(err, ImageError::InvalidModule { .. }), "{err}");
        let message = chain(&err);
        assert!(
            message.contains(file) && message.contains(want),
            "{message}"
        );
        for secret in ["SECRET", "secret_token", "password"] {
            assert!(!message.contains(secret), "{message}");
        }
    }
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn a_name_with_a_dot_only_registry_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&tmp.path().join("store")).unwrap();
    let module = tmp.path().join("m.wat");
    fs::write(&module, "(module)").unwrap();
    for name in ["../x", "./x", "x/../y", ".."] {
        let err = store.import_wasm(&module, name).unwrap_err();
        assert!(
            matches!(err, ImageError::InvalidName { .. }),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(&format!("\"{name}\"")), "{err}");
    }
    assert!(store.list().unwrap().is_empty());
    store.import_wasm(&module, "x").unwrap();
}
