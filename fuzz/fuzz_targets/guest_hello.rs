//! The host's and the guest's greeting scan (`warren_guest::hello`) on arbitrary bytes, which
//! a guest controls: never panics, and a greeting found is well formed and inside the input.
#![no_main]

#[path = "../../crates/guest/src/hello.rs"]
#[allow(dead_code)]
mod hello;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for prefix in [hello::HOST_HELLO, hello::GUEST_HELLO] {
        if let Some((end, nonce)) = hello::find_hello(data, prefix) {
            assert!(end <= data.len());
            assert_eq!(nonce.len(), hello::NONCE_LEN);
            assert!(nonce.iter().all(u8::is_ascii_hexdigit));
            assert_eq!(data[end - 1], b'\n');
        }
        assert!(hello::droppable(data, prefix) <= data.len());
    }
});
