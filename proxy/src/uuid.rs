//! Random (version 4) UUIDs in their 36-character text form, without allocating: the request
//! ids the HTTP connection manager generates, and the names Envoy gives unnamed listeners.

use rand::Rng;

/// A fresh version-4, variant-1 UUID such as `9b2c4f1e-0d3a-4c5b-8e6f-112233445566`.
pub fn v4() -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let random: u128 = rand::rng().random();
    let mut bytes = random.to_be_bytes();
    bytes[6] = bytes[6] & 0x0f | 0x40; // version 4
    bytes[8] = bytes[8] & 0x3f | 0x80; // variant 1 (RFC 9562)
    let mut out = [b'-'; 36];
    let mut at = 0;
    for (index, byte) in bytes.into_iter().enumerate() {
        // The dashes before the 5th, 7th, 9th and 11th bytes.
        at += usize::from(matches!(index, 4 | 6 | 8 | 10));
        out[at] = HEX[usize::from(byte >> 4)];
        out[at + 1] = HEX[usize::from(byte & 0xf)];
        at += 2;
    }
    out
}

/// [`v4`] as a `String`.
pub fn v4_string() -> String {
    v4().iter().map(|&byte| byte as char).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn uuids_are_version_4_variant_1_and_differ() {
        let (a, b) = (super::v4_string(), super::v4_string());
        assert_ne!(a, b);
        // Every one: the fixed digits sit where the random ones around them could hide a slip.
        for _ in 0..256 {
            let uuid = super::v4_string();
            let parts: Vec<&str> = uuid.split('-').collect();
            assert_eq!(
                parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12]
            );
            assert!(parts[2].starts_with('4'), "{uuid}");
            assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"), "{uuid}");
            assert!(uuid.bytes().all(|c| c == b'-' || c.is_ascii_hexdigit()));
        }
    }
}
