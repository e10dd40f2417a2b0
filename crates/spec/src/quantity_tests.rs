use super::*;

#[test]
fn cpu_good() {
    let cases: &[(&str, f64)] = &[
        ("100m", 0.1),
        ("0.5", 0.5),
        ("1.5", 1.5),
        ("2", 2.0),
        ("+2", 2.0),
        ("1e3", 1000.0),
        ("1E3", 1000.0),
        ("1k", 1000.0),
        ("1Ki", 1024.0),
        ("1500m", 1.5),
        ("0.0001", 0.001),
        ("1n", 0.001),
        ("250000u", 0.25),
        ("2.", 2.0),
        (".5", 0.5),
        ("0", 0.0),
        ("-0", 0.0),
        ("000.000", 0.0),
        ("5e-1", 0.5),
        ("1e+2", 100.0),
        ("1G", 1e9),
        ("0.1234", 0.124),
        ("1.00000000000000000000000001", 1.001),
    ];
    for (input, want) in cases {
        assert_eq!(parse_cpu(input), Ok(*want), "{input}");
    }
}

#[test]
fn bytes_good() {
    let cases: &[(&str, u64)] = &[
        ("512Mi", 512 << 20),
        ("2Gi", 2 << 30),
        ("1G", 1_000_000_000),
        ("1Ki", 1024),
        ("1k", 1000),
        ("1M", 1_000_000),
        ("1e3", 1000),
        ("1.5Gi", 1_610_612_736),
        ("1000", 1000),
        ("0.5", 1),
        ("1.1", 2),
        ("1E", 1_000_000_000_000_000_000),
        ("15Ei", 15 << 60),
        ("18446744073709551615", u64::MAX),
        ("0.000000000000000000000000000000000000000000001Ei", 1),
        ("0e999999999999999999999", 0),
        ("1e-3", 1),
        ("1.5Ki", 1536),
        // 21 significant digits: the dropped digit still rounds up exactly.
        ("10000000000000000000.5", 10_000_000_000_000_000_001),
    ];
    for (input, want) in cases {
        assert_eq!(parse_bytes(input), Ok(*want), "{input}");
    }
}

#[test]
fn count_and_bandwidth() {
    assert_eq!(parse_count("100"), Ok(100));
    assert_eq!(parse_count("1k"), Ok(1000));
    assert_eq!(parse_count("1.5k"), Ok(1500));
    assert_eq!(parse_count("1Ki"), Ok(1024));
    let err = parse_count("1.5").unwrap_err();
    assert_eq!(err.to_string(), r#""1.5" must be a whole number"#);
    assert!(parse_count("100m").is_err());
    assert_eq!(parse_bandwidth("100M"), Ok(100_000_000));
    assert_eq!(parse_bandwidth("1G"), Ok(1_000_000_000));
    assert!(parse_bandwidth("10m").is_err());
}

const BAD_COMMON: &[&str] = &[
    "", " 1", "1 ", "1 Gi", "\t2", "-1", "--1", "+", "-", "abc", "1x", "2Gx", "1..5", "1e", "e3",
    "0x10", "1Mi1", "NaN", "nan", "inf", "-inf", "Infinity", ".", "1.2.3", "1ee3", "1e3.5", "Gi",
    "1gi", "1KI", "1K", "1mi", "1e+", "1e-", "++1", "+-1", "1_000", "1,5", "١", "1µ",
];

#[test]
fn bad_inputs_name_the_input() {
    let too_large_bytes = [
        "20Ei",
        "1e30",
        "99999999999999999999",
        "1e1000000000000",
        "16384Pi",
        "16Ei",
    ];
    let bytes_only = ["1.5m", "1m", "1n", "1u"];
    let cases = BAD_COMMON.iter().chain(&too_large_bytes).chain(&bytes_only);
    for input in cases {
        let err = parse_bytes(input).unwrap_err();
        assert_eq!(err.input, *input);
        let msg = err.to_string();
        assert!(msg.contains(&format!("{input:?}")), "{msg}");
    }
    for input in BAD_COMMON.iter().chain(&["1e30", "1000000001", "2Ei"]) {
        let err = parse_cpu(input).unwrap_err();
        assert!(err.to_string().contains(&format!("{input:?}")), "{err}");
    }
}

#[test]
fn error_messages() {
    let msg = |r: Result<u64, QuantityError>| r.unwrap_err().to_string();
    assert_eq!(
        msg(parse_bytes("2Gx")),
        r#""2Gx" is not a quantity (expected e.g. "512Mi", "2G")"#
    );
    assert_eq!(msg(parse_bytes("-1")), r#""-1" must not be negative"#);
    assert_eq!(
        msg(parse_bytes("20Ei")),
        r#""20Ei" is too large (max 18446744073709551615 bytes)"#
    );
    assert_eq!(
        msg(parse_bytes("")),
        r#""" is empty (expected e.g. "512Mi", "2G")"#
    );
    assert_eq!(
        msg(parse_bytes(" 1")),
        r#"" 1" must not contain whitespace"#
    );
    assert_eq!(
        msg(parse_bytes("1500m")),
        r#""1500m" uses the fractional suffix "m", which is not allowed for bytes (did you mean "M"?)"#
    );
    assert_eq!(
        parse_cpu("1x").unwrap_err().to_string(),
        r#""1x" is not a quantity (expected e.g. "500m", "2")"#
    );
    assert_eq!(
        parse_cpu("2e9").unwrap_err().to_string(),
        r#""2e9" is too large (max 1000000000 cores)"#
    );
    // 21 digits whose last one moves the ceiling by one or two bytes: refused, not guessed.
    let precise = format!("10.{}1Ei", "0".repeat(18));
    assert_eq!(
        msg(parse_bytes(&precise)),
        format!("{precise:?} has more than 20 significant digits")
    );
    // ...but a dropped digit that cannot change the result is fine.
    assert_eq!(
        parse_bytes(&format!("1.{}1Ei", "0".repeat(40))),
        Ok((1 << 60) + 1)
    );
}

#[test]
fn long_inputs_are_shortened_in_errors() {
    let long = "9".repeat(10_000);
    let err = parse_bytes(&long).unwrap_err();
    assert_eq!(
        err.kind,
        QuantityErrorKind::TooLarge {
            max: Unit::Bytes.max()
        }
    );
    assert!(err.input.len() < 100);
    let err = parse_bytes(&"é".repeat(100)).unwrap_err();
    assert!(err.input.ends_with("..."));
}

#[test]
fn formatting() {
    assert_eq!(format_cpu(2.0), "2");
    assert_eq!(format_cpu(0.5), "500m");
    assert_eq!(format_cpu(1.5), "1500m");
    assert_eq!(format_cpu(0.0), "0");
    assert_eq!(format_cpu(0.001), "1m");
    assert_eq!(format_cpu(f64::NAN), "NaN");
    assert_eq!(format_bytes(512 << 20), "512Mi");
    assert_eq!(format_bytes(1 << 30), "1Gi");
    assert_eq!(format_bytes(1536 << 20), "1536Mi");
    assert_eq!(format_bytes(1000), "1000");
    assert_eq!(format_bytes(0), "0");
    assert_eq!(format_bytes(u64::MAX), "18446744073709551615");
    assert_eq!(format_bytes(1 << 63), "8Ei");
}

#[test]
fn round_trips_at_the_edges() {
    for bytes in [
        0,
        1,
        1023,
        1024,
        1 << 60,
        u64::MAX,
        u64::MAX - 1,
        15 << 60,
        3 << 59,
    ] {
        assert_eq!(parse_bytes(&format_bytes(bytes)), Ok(bytes));
    }
    for millis in [0u64, 1, 999, 1000, 1001, 1_000_000_000_000, 999_999_999_999] {
        let cores = millis as f64 / 1000.0;
        assert_eq!(parse_cpu(&format_cpu(cores)), Ok(cores), "{millis}");
    }
}
