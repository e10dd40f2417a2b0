//! Resource extraction from arbitrary annotations: errors are fine, panics are not.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use warren_spec::{ResourceRequirements, extract_resources};

const KEYS: [&str; 8] = [
    warren_spec::ANNOTATION_CPU_LIMIT,
    warren_spec::ANNOTATION_CPU_REQUEST,
    warren_spec::ANNOTATION_MEMORY_LIMIT,
    warren_spec::ANNOTATION_MEMORY_REQUEST,
    warren_spec::ANNOTATION_PID_LIMIT,
    warren_spec::ANNOTATION_STORAGE_LIMIT,
    warren_spec::ANNOTATION_EPHEMERAL_STORAGE_LIMIT,
    warren_spec::ANNOTATION_NETWORK_BANDWIDTH,
];

// Input: lines of `key=value`. A key that is a single digit stands for one of the known keys,
// so the fuzzer reaches the parsers without having to guess "resources.limits.memory".
fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut annotations = BTreeMap::new();
    for line in text.lines() {
        let (key, value) = line.split_once('=').unwrap_or((line, ""));
        let key = match key.parse::<usize>() {
            Ok(i) if i < KEYS.len() => KEYS[i].to_string(),
            _ => key.to_string(),
        };
        annotations.insert(key, value.to_string());
    }
    if let Ok(info) = extract_resources(&annotations, None, &ResourceRequirements::default()) {
        let json = info.to_json_pretty();
        assert_eq!(
            serde_json::from_str::<warren_spec::ResourceInfo>(&json).ok(),
            Some(info)
        );
    }
});
