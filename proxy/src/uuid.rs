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
    let mut digits = [0u8; 32];
    for (index, chunk) in digits.chunks_exact_mut(8).enumerate() {
        let word = (value >> (96 - 32 * index)) as u32;
        chunk.copy_from_slice(&hex_digits(word));
    }
    let mut out = [b'-'; 36];
    out[..8].copy_from_slice(&digits[..8]);
    out[9..13].copy_from_slice(&digits[8..12]);
    out[14..18].copy_from_slice(&digits[12..16]);
    out[19..23].copy_from_slice(&digits[16..20]);
    out[24..].copy_from_slice(&digits[20..]);
    out
}

/// The eight lower-case hex digits of `word`, most significant first, computed eight at a time
/// in one 64-bit word: a request id is made per request, and a digit-by-digit table loop cost
/// it about 270 instructions.
fn hex_digits(word: u32) -> [u8; 8] {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    // Spread the eight nibbles into the eight bytes, the lowest nibble in the lowest byte.
    let mut spread = u64::from(word);
    spread = (spread | spread << 16) & 0x0000_ffff_0000_ffff;
    spread = (spread | spread << 8) & 0x00ff_00ff_00ff_00ff;
    spread = (spread | spread << 4) & 0x0f0f_0f0f_0f0f_0f0f;
    // 1 in each byte whose nibble is 10 or more (adding 6 carries it into bit 4).
    let letter = ((spread + ONES * 6) >> 4) & ONES;
    // '0' + n, and 'a' - '0' - 10 = 39 more for a letter; no byte carries into the next.
    let ascii = spread + ONES * u64::from(b'0') + letter * 39;
    ascii.to_be_bytes()
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

    #[test]
    fn hex_digits_match_the_formatter() {
        let words = [
            0,
            1,
            9,
            10,
            15,
            16,
            0x0123_4567,
            0x89ab_cdef,
            0xffff_ffff,
            0xa0b1_c2d3,
        ];
        let mut random = 0x9e37_79b9_u32;
        for word in words
            .into_iter()
            .chain(std::iter::from_fn(|| {
                random = random.wrapping_mul(0x0100_0193).wrapping_add(0x2f);
                Some(random)
            }))
            .take(10_000)
        {
            assert_eq!(
                super::hex_digits(word),
                format!("{word:08x}").as_bytes(),
                "{word:#x}"
            );
        }
    }
}
