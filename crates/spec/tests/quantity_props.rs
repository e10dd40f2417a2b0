//! Properties of quantity parsing: never panics, and formatting round-trips.

use proptest::prelude::*;
use warren_spec::{
    MAX_CPU_CORES, format_bytes, format_cpu, parse_bandwidth, parse_bytes, parse_count, parse_cpu,
};

/// Strings that look like quantities, so the parser's deeper paths get exercised.
fn quantity_like() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[0-9.eEkKMGTPimun+-]{0,30}").expect("valid regex")
}

fn parse_all(s: &str) {
    let _ = parse_cpu(s);
    let _ = parse_bytes(s);
    let _ = parse_count(s);
    let _ = parse_bandwidth(s);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn never_panics_on_anything(s in any::<String>()) {
        parse_all(&s);
    }

    #[test]
    fn never_panics_on_quantity_like(s in quantity_like()) {
        parse_all(&s);
    }

    #[test]
    fn accepted_values_round_trip(s in quantity_like()) {
        if let Ok(bytes) = parse_bytes(&s) {
            prop_assert_eq!(parse_bytes(&format_bytes(bytes)), Ok(bytes));
        }
        if let Ok(cores) = parse_cpu(&s) {
            prop_assert_eq!(parse_cpu(&format_cpu(cores)), Ok(cores));
        }
    }

    #[test]
    fn bytes_round_trip(bytes in any::<u64>()) {
        prop_assert_eq!(parse_bytes(&format_bytes(bytes)), Ok(bytes));
    }

    #[test]
    fn binary_multiples_round_trip(n in 1u64..1024, shift in prop::sample::select(vec![10u32, 20, 30, 40, 50])) {
        let bytes = n << shift;
        prop_assert_eq!(parse_bytes(&format_bytes(bytes)), Ok(bytes));
        prop_assert!(!format_bytes(bytes).chars().all(|c| c.is_ascii_digit()));
    }

    #[test]
    fn millicores_round_trip(millis in 0..=MAX_CPU_CORES * 1000) {
        let cores = millis as f64 / 1000.0;
        prop_assert_eq!(parse_cpu(&format_cpu(cores)), Ok(cores));
    }

    #[test]
    fn plain_integers_parse_exactly(n in any::<u64>()) {
        prop_assert_eq!(parse_bytes(&n.to_string()), Ok(n));
        prop_assert_eq!(parse_count(&n.to_string()), Ok(n));
    }

    #[test]
    fn decimal_fractions_of_bytes_round_up(whole in 0u64..1_000_000, frac in 1u32..1000) {
        let s = format!("{whole}.{frac:03}");
        prop_assert_eq!(parse_bytes(&s), Ok(whole + 1));
    }
}
