//! SandboxSpec from arbitrary JSON, then validation: errors are fine, panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_spec::SandboxSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<SandboxSpec>(data) else {
        return;
    };
    let first = spec.validate();
    let all = spec.validate_all();
    // Both entry points agree on the outcome and on the first error.
    match (first, all) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(e), Err(errors)) => assert_eq!(Some(&e), errors.first()),
        (a, b) => panic!("validate {a:?} disagrees with validate_all {b:?}"),
    }
});
