//! `logs::parse_line` on arbitrary bytes: never panics; what parses re-formats to a line that
//! parses to the same record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_runtime::logs::{format_timestamp, parse_line};

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = parse_line(data) {
        let mut line = format_timestamp(record.time).into_bytes();
        line.push(b' ');
        line.extend_from_slice(record.stream.as_str().as_bytes());
        line.extend_from_slice(if record.partial { b" P " } else { b" F " });
        line.extend_from_slice(&record.content);
        let again = parse_line(&line).expect("a formatted record parses");
        assert_eq!(again, record);
    }
});
