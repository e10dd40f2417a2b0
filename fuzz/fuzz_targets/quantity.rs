//! Quantity parsers: never panic, and whatever they accept formats and re-parses to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_spec::{format_bytes, format_cpu, parse_bandwidth, parse_bytes, parse_count, parse_cpu};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cores) = parse_cpu(s) {
        assert!(cores.is_finite() && cores >= 0.0, "{s:?} -> {cores}");
        assert_eq!(parse_cpu(&format_cpu(cores)), Ok(cores), "{s:?}");
    }
    if let Ok(bytes) = parse_bytes(s) {
        assert_eq!(parse_bytes(&format_bytes(bytes)), Ok(bytes), "{s:?}");
    }
    if let Ok(n) = parse_count(s) {
        // A whole count is also a valid byte count, with the same value.
        assert_eq!(parse_bytes(s), Ok(n), "{s:?}");
    }
    let _ = parse_bandwidth(s);
});
