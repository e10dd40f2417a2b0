//! The greeting that starts every host connection, before HTTP/2. It has no dependencies,
//! so the fuzz target includes this file as it is.

/// The greeting that starts every host connection, before HTTP/2: `WARREN-HOST:<nonce>\n`
/// from the host, answered `WARREN-GUEST:<nonce>\n`. A virtio-serial port is one byte
/// stream for the VM's whole life, and a host that died mid-conversation leaves bytes in
/// it both ways; each side skips whatever comes before the greeting with its nonce, so a new
/// connection starts clean.
pub const HOST_HELLO: &[u8] = b"WARREN-HOST:";
pub const GUEST_HELLO: &[u8] = b"WARREN-GUEST:";
/// Hex digits of a greeting's nonce.
pub const NONCE_LEN: usize = 32;
/// Most stale bytes either side skips while looking for a greeting.
pub const MAX_STALE: usize = 16 << 20;

/// Finds the first complete greeting `prefix` + [`NONCE_LEN`] hex digits + `\n` in `buf`:
/// where it ends and its nonce. Anything else in `buf` is skipped; never panics.
pub fn find_hello<'a>(buf: &'a [u8], prefix: &[u8]) -> Option<(usize, &'a [u8])> {
    let total = prefix.len() + NONCE_LEN + 1;
    let mut from = 0;
    while from + total <= buf.len() {
        let at = from
            + buf[from..]
                .windows(prefix.len())
                .position(|w| w == prefix)?;
        let nonce = buf.get(at + prefix.len()..at + prefix.len() + NONCE_LEN)?;
        if buf.get(at + total - 1) == Some(&b'\n') && nonce.iter().all(u8::is_ascii_hexdigit) {
            return Some((at + total, nonce));
        }
        from = at + 1;
    }
    None
}

/// How much of a scanned buffer without a greeting can be dropped: all but the tail that
/// could still be the start of one.
pub fn droppable(buf: &[u8], prefix: &[u8]) -> usize {
    buf.len().saturating_sub(prefix.len() + NONCE_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings_are_found_after_stale_bytes() {
        let nonce = "0123456789abcdef0123456789abcdef";
        let mut buf = b"\x00\x00\x12garbage WARREN-HOST:xyz\n".to_vec();
        buf.extend_from_slice(format!("WARREN-HOST:{nonce}\nrest").as_bytes());
        let (end, found) = find_hello(&buf, HOST_HELLO).expect("found");
        assert_eq!(found, nonce.as_bytes());
        assert_eq!(&buf[end..], b"rest");
        assert!(find_hello(b"WARREN-HOST:0123", HOST_HELLO).is_none());
        assert!(find_hello(b"", HOST_HELLO).is_none());
        // Truncations and mutations never panic.
        for cut in 0..buf.len() {
            let _ = find_hello(&buf[..cut], HOST_HELLO);
            let _ = find_hello(&buf[cut..], GUEST_HELLO);
        }
        assert_eq!(droppable(&[0; 10], HOST_HELLO), 0);
        assert_eq!(droppable(&[0; 100], HOST_HELLO), 100 - 12 - 32);
    }
}
