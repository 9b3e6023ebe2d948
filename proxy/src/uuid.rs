//! Random (version 4) UUIDs in their 36-character text form, without allocating: the request
//! ids the HTTP connection manager generates, and the names Envoy gives unnamed listeners.

use rand::Rng;

/// A fresh version-4, variant-1 UUID such as `9b2c4f1e-0d3a-4c5b-8e6f-112233445566`.
pub fn v4() -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits: u128 = rand::rng().random();
    let bits = (bits & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let mut out = [0u8; 36];
    let mut nibble = 0;
    for (index, byte) in out.iter_mut().enumerate() {
        if matches!(index, 8 | 13 | 18 | 23) {
            *byte = b'-';
            continue;
        }
        *byte = HEX[((bits >> (124 - 4 * nibble)) & 0xf) as usize];
        nibble += 1;
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
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'), "{a}");
        assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"), "{a}");
        assert!(a.bytes().all(|c| c == b'-' || c.is_ascii_hexdigit()));
    }
}
