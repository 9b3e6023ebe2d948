//! Random (version 4) UUIDs in their 36-character text form, without allocating: the request
//! ids the HTTP connection manager generates, and the names Envoy gives unnamed listeners.

use rand::Rng;

/// A fresh version-4, variant-1 UUID such as `9b2c4f1e-0d3a-4c5b-8e6f-112233445566`.
pub fn v4() -> [u8; 36] {
    let mut bytes = rand::rng().random::<u128>().to_be_bytes();
    bytes[6] = bytes[6] & 0x0f | 0x40; // version 4
    bytes[8] = bytes[8] & 0x3f | 0x80; // variant 1 (RFC 9562)
    text(u128::from_be_bytes(bytes))
}

/// `value` in the UUID text form: 32 lower-case hex digits in groups of 8, 4, 4, 4 and 12.
fn text(value: u128) -> [u8; 36] {
    let digits = crate::hex::lower::<32>(value);
    let mut out = [b'-'; 36];
    out[..8].copy_from_slice(&digits[..8]);
    out[9..13].copy_from_slice(&digits[8..12]);
    out[14..18].copy_from_slice(&digits[12..16]);
    out[19..23].copy_from_slice(&digits[16..20]);
    out[24..].copy_from_slice(&digits[20..]);
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
            assert!(!uuid.bytes().any(|c| c.is_ascii_uppercase()), "{uuid}");
        }
    }

    #[test]
    fn the_text_form_is_the_value_in_hex_with_dashes() {
        for value in [0, u128::MAX, 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210] {
            let hex = format!("{value:032x}");
            let expected = [
                &hex[..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..],
            ]
            .join("-");
            assert_eq!(super::text(value), expected.as_bytes(), "{value:#x}");
        }
    }
}
