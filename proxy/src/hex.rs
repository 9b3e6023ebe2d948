//! Lower-case hex digits of integers, made eight at a time in one 64-bit word: the ids made on
//! the request path (request ids, trace context headers) are written without a table lookup
//! per digit.

/// The last `N` hex digits of `value`, most significant first; `N` is 8, 16, 24 or 32.
pub fn lower<const N: usize>(value: u128) -> [u8; N] {
    const { assert!(N.is_multiple_of(8) && N <= 32) };
    let mut out = [0u8; N];
    for (index, chunk) in out.chunks_exact_mut(8).enumerate() {
        let shift = 4 * (N - 8 * (index + 1));
        chunk.copy_from_slice(&word((value >> shift) as u32));
    }
    out
}

/// The eight hex digits of `word`. A digit-by-digit table loop cost a request id about 270
/// instructions; this costs about a tenth of that.
fn word(word: u32) -> [u8; 8] {
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

#[cfg(test)]
mod tests {
    #[test]
    fn words_match_the_formatter() {
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
        let more = std::iter::from_fn(|| {
            random = random.wrapping_mul(0x0100_0193).wrapping_add(0x2f);
            Some(random)
        });
        for word in words.into_iter().chain(more).take(10_000) {
            assert_eq!(
                super::word(word),
                format!("{word:08x}").as_bytes(),
                "{word:#x}"
            );
        }
    }

    #[test]
    fn each_width_is_the_low_digits_of_the_value() {
        let value = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210_u128;
        for value in [0, u128::MAX, value, value.rotate_left(36)] {
            let hex = format!("{value:032x}").into_bytes();
            assert_eq!(super::lower::<32>(value), hex[..]);
            assert_eq!(super::lower::<24>(value), hex[8..]);
            assert_eq!(super::lower::<16>(value), hex[16..]);
            assert_eq!(super::lower::<8>(value), hex[24..]);
        }
    }
}
