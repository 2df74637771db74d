//! AES-128-CMAC (RFC 4493, NIST SP 800-38B) on the processor's AES instructions: the
//! credential fingerprint where the processor has them (x86-64 with AES-NI), about a third of
//! SipHash-1-3-128's instructions for an API key of 32 bytes (two AES blocks of eleven
//! one-instruction rounds, against SipHash's eleven rounds of about fourteen instructions).
//! A keyed pseudorandom function of 128 bits, as the fingerprint must be: the 128-bit
//! fingerprint stands for the key. Elsewhere [`Fingerprinter`](super::key::Fingerprinter)
//! keeps SipHash.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicPtr, Ordering};

/// AES-128's eleven round keys, then the two CMAC subkeys (K1 for a message ending on a whole
/// block, K2 for a padded one), 16 bytes each.
#[repr(C, align(16))]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Schedule([[u8; 16]; 13]);

/// One secret's CMAC keys. They are read on every request and replaced only when the
/// fingerprinter draws new secrets (at start-up, and after a SnapStart restore, when no request
/// is under way): a pointer to an immutable [`Schedule`], so that a request reads it with one
/// load and no lock. A replaced schedule is not freed (a request might still read it): two per
/// restore (one per kind of credential), 208 bytes each, for the process's life; the schedule
/// in force is freed with the keys.
#[derive(Default)]
pub(crate) struct CmacKeys {
    schedule: AtomicPtr<Schedule>,
}

impl Drop for CmacKeys {
    fn drop(&mut self) {
        let p = *self.schedule.get_mut();
        if !p.is_null() {
            // SAFETY: made by `Box::into_raw` in `set`; `&mut self`: nobody reads it any more.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

impl CmacKeys {
    /// Whether this processor runs [`mac`](Self::mac): checked once, when the fingerprinter is
    /// made.
    pub(crate) fn supported() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("sse2")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Sets the keys of `key`. Only where [`supported`](Self::supported).
    #[cfg_attr(not(target_arch = "x86_64"), allow(clippy::unused_self))]
    pub(crate) fn set(&self, key: [u8; 16]) {
        #[cfg(target_arch = "x86_64")]
        {
            assert!(Self::supported(), "AES-NI");
            // SAFETY: the processor has AES-NI and SSE2 (checked just above).
            let schedule = Box::new(Schedule(unsafe { x86::schedule(key) }));
            // The one before is left to requests that may still read it (see the type).
            let _ = self.schedule.swap(Box::into_raw(schedule), Ordering::AcqRel);
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = key;
            unreachable!("CMAC keys are only set where the processor has AES instructions");
        }
    }

    /// The CMAC of `message`: the tag's first eight bytes and its last eight, little-endian.
    /// Only where [`supported`](Self::supported), after [`set`](Self::set).
    #[inline]
    pub(crate) fn mac(&self, message: &[u8]) -> (u64, u64) {
        let p = self.schedule.load(Ordering::Acquire);
        assert!(!p.is_null(), "CMAC keys set before use");
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `set` made it (it asserts AES-NI and SSE2) and never frees it while
            // `self` lives; it is never written after.
            unsafe { x86::mac(&*p, message) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = message;
            unreachable!("CMAC is only used where the processor has AES instructions");
        }
    }

    #[cfg(all(test, target_arch = "x86_64"))]
    fn schedule(&self) -> &Schedule {
        // SAFETY: as in `mac`.
        unsafe { &*self.schedule.load(Ordering::Acquire) }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Schedule;
    use std::arch::x86_64::{
        __m128i, _mm_aesenc_si128, _mm_aesenclast_si128, _mm_aeskeygenassist_si128, _mm_loadu_si128, _mm_set_epi64x,
        _mm_setzero_si128, _mm_shuffle_epi32, _mm_slli_si128, _mm_storeu_si128, _mm_xor_si128,
    };

    /// The round keys, K1 and K2 of `key` (RFC 4493, 2.3), as bytes.
    #[target_feature(enable = "aes,sse2")]
    pub(super) unsafe fn schedule(key: [u8; 16]) -> [[u8; 16]; 13] {
        // SAFETY (of each intrinsic below): this function's target features; the loads and
        // stores are of 16-byte arrays.
        let mut rk = [_mm_setzero_si128(); 11];
        rk[0] = unsafe { _mm_loadu_si128(key.as_ptr().cast()) };
        macro_rules! round {
            ($i:expr, $rcon:expr) => {{
                let assist = _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(rk[$i - 1]));
                let mut k = rk[$i - 1];
                k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
                k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
                k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
                rk[$i] = _mm_xor_si128(k, assist);
            }};
        }
        round!(1, 0x01);
        round!(2, 0x02);
        round!(3, 0x04);
        round!(4, 0x08);
        round!(5, 0x10);
        round!(6, 0x20);
        round!(7, 0x40);
        round!(8, 0x80);
        round!(9, 0x1b);
        round!(10, 0x36);
        let mut out = [[0u8; 16]; 13];
        for (o, k) in out.iter_mut().zip(rk) {
            unsafe { _mm_storeu_si128(o.as_mut_ptr().cast(), k) };
        }
        // L = AES(K, 0^128); K1 = dbl(L); K2 = dbl(K1): a left shift of the 128-bit string,
        // and 0x87 into the last byte when the bit shifted out was set.
        let mut l = [0u8; 16];
        unsafe { _mm_storeu_si128(l.as_mut_ptr().cast(), encrypt(&rk, _mm_setzero_si128())) };
        let dbl = |b: [u8; 16]| {
            let v = u128::from_be_bytes(b);
            ((v << 1) ^ if v >> 127 == 1 { 0x87 } else { 0 }).to_be_bytes()
        };
        out[11] = dbl(l);
        out[12] = dbl(out[11]);
        out
    }

    #[inline]
    #[target_feature(enable = "aes,sse2")]
    pub(super) fn encrypt(rk: &[__m128i; 11], block: __m128i) -> __m128i {
        let mut b = _mm_xor_si128(block, rk[0]);
        for k in &rk[1..10] {
            b = _mm_aesenc_si128(b, *k);
        }
        _mm_aesenclast_si128(b, rk[10])
    }

    #[inline]
    #[target_feature(enable = "sse2")]
    pub(super) fn load(block: &[u8; 16]) -> __m128i {
        // SAFETY: 16 bytes.
        unsafe { _mm_loadu_si128(block.as_ptr().cast()) }
    }

    /// AES-CMAC of `message` under `schedule` (RFC 4493, 2.4).
    #[target_feature(enable = "aes,sse2")]
    pub(super) unsafe fn mac(schedule: &Schedule, message: &[u8]) -> (u64, u64) {
        let words = &schedule.0;
        let mut rk = [_mm_setzero_si128(); 11];
        for (k, w) in rk.iter_mut().zip(words) {
            *k = load(w);
        }
        // Every block but the last, which is whole (and XORed with K1) or padded (with K2).
        let before_last = message.len().saturating_sub(1) / 16;
        let mut x = _mm_setzero_si128();
        for block in message.chunks_exact(16).take(before_last) {
            // SAFETY: a 16-byte chunk.
            x = encrypt(&rk, _mm_xor_si128(x, unsafe { _mm_loadu_si128(block.as_ptr().cast()) }));
        }
        let last = &message[before_last * 16..];
        let m = if last.len() == 16 {
            // SAFETY: 16 bytes.
            _mm_xor_si128(unsafe { _mm_loadu_si128(last.as_ptr().cast()) }, load(&words[11]))
        } else {
            // The last bytes, then 0x80, then zeros. From the message's last 16 bytes where it
            // has as many (the bytes before `last` shifted out): no copy of a variable length.
            let n = last.len();
            let padded = match message.last_chunk::<16>() {
                Some(tail) => (u128::from_le_bytes(*tail) >> (8 * (16 - n))) | 0x80 << (8 * n),
                None => {
                    let mut padded = [0u8; 16];
                    padded[..n].copy_from_slice(last);
                    padded[n] = 0x80;
                    u128::from_le_bytes(padded)
                }
            };
            _mm_xor_si128(_mm_set_epi64x((padded >> 64) as i64, padded as i64), load(&words[12]))
        };
        let tag = encrypt(&rk, _mm_xor_si128(x, m));
        let mut out = [0u8; 16];
        // SAFETY: a 16-byte array.
        unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), tag) };
        (u64::from_le_bytes(out[..8].try_into().unwrap()), u64::from_le_bytes(out[8..].try_into().unwrap()))
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::CmacKeys;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn tag(keys: &CmacKeys, message: &[u8]) -> Vec<u8> {
        let (lo, hi) = keys.mac(message);
        [lo.to_le_bytes(), hi.to_le_bytes()].concat()
    }

    /// RFC 4493, section 4: the subkeys and the four examples (messages of 0, 16, 40 and 64
    /// bytes: empty, one whole block, a padded last block, whole blocks only).
    #[test]
    fn the_test_vectors_of_rfc_4493() {
        if !CmacKeys::supported() {
            assert!(std::env::var_os("CI").is_none(), "CI runs on processors with AES-NI");
            eprintln!("SKIPPED: this processor has no AES-NI");
            return;
        }
        let keys = CmacKeys::default();
        keys.set(hex("2b7e1516 28aed2a6 abf71588 09cf4f3c").try_into().unwrap());
        let word = |i: usize| keys.schedule().0[i].to_vec();
        assert_eq!(word(11), hex("fbeed618 35713366 7c85e08f 7236a8de"), "K1");
        assert_eq!(word(12), hex("f7ddac30 6ae266cc f90bc11e e46d513b"), "K2");
        let m = hex("6bc1bee2 2e409f96 e93d7e11 7393172a ae2d8a57 1e03ac9c 9eb76fac 45af8e51 \
             30c81c46 a35ce411 e5fbc119 1a0a52ef f69f2445 df4f9b17 ad2b417b e66c3710");
        assert_eq!(tag(&keys, &[]), hex("bb1d6929 e9593728 7fa37d12 9b756746"));
        assert_eq!(tag(&keys, &m[..16]), hex("070a16b4 6b4d4144 f79bdd9d d04a287c"));
        assert_eq!(tag(&keys, &m[..40]), hex("dfa66747 de9ae630 30ca3261 1497c827"));
        assert_eq!(tag(&keys, &m[..64]), hex("51f0bebf 7e3b9d92 fc497417 79363cfe"));
    }

    /// AES-128 itself, apart from CMAC: FIPS-197, appendix C.1 (the key schedule and one
    /// block's encryption).
    #[test]
    fn aes_128_of_fips_197() {
        use std::arch::x86_64::{_mm_loadu_si128, _mm_storeu_si128};
        if !CmacKeys::supported() {
            assert!(std::env::var_os("CI").is_none(), "CI runs on processors with AES-NI");
            eprintln!("SKIPPED: this processor has no AES-NI");
            return;
        }
        let key: [u8; 16] = hex("00010203 04050607 08090a0b 0c0d0e0f").try_into().unwrap();
        let plain = hex("00112233 44556677 8899aabb ccddeeff");
        // SAFETY: the processor has AES-NI and SSE2 (checked above); 16-byte loads and stores.
        let cipher = unsafe {
            let schedule = super::x86::schedule(key);
            let rk: [_; 11] = std::array::from_fn(|i| super::x86::load(&schedule[i]));
            let block = super::x86::encrypt(&rk, _mm_loadu_si128(plain.as_ptr().cast()));
            let mut out = [0u8; 16];
            _mm_storeu_si128(out.as_mut_ptr().cast(), block);
            out
        };
        assert_eq!(cipher.to_vec(), hex("69c4e0d8 6a7b0430 d8cdb780 70b4c55a"));
    }

    /// Every length from 0 to 80 bytes gives its own tag, and a message differing in one bit
    /// anywhere another.
    #[test]
    fn every_length_and_every_bit_counts() {
        if !CmacKeys::supported() {
            assert!(std::env::var_os("CI").is_none(), "CI runs on processors with AES-NI");
            eprintln!("SKIPPED: this processor has no AES-NI");
            return;
        }
        let keys = CmacKeys::default();
        keys.set(*b"0123456789abcdef");
        let message: Vec<u8> = (0..80u8).collect();
        let mut seen = std::collections::HashSet::new();
        for n in 0..=80 {
            assert!(seen.insert(keys.mac(&message[..n])), "length {n}");
            for bit in 0..n * 8 {
                let mut flipped = message[..n].to_vec();
                flipped[bit / 8] ^= 1 << (bit % 8);
                assert_ne!(keys.mac(&flipped), keys.mac(&message[..n]), "length {n}, bit {bit}");
            }
        }
        // A message ending in the padding's own byte is not its padded shorter self.
        assert_ne!(keys.mac(&[0x80]), keys.mac(&[]));
    }

    /// RFC 4493's algorithm written out block by block (the last one copied into a padded
    /// block), against `mac`, which takes a short last block from the message's last 16 bytes.
    #[test]
    fn the_last_block_read_in_place_is_the_padded_copy() {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_setzero_si128, _mm_storeu_si128, _mm_xor_si128};
        if !CmacKeys::supported() {
            assert!(std::env::var_os("CI").is_none(), "CI runs on processors with AES-NI");
            eprintln!("SKIPPED: this processor has no AES-NI");
            return;
        }
        let keys = CmacKeys::default();
        keys.set(*b"fedcba9876543210");
        // SAFETY: the processor has AES-NI and SSE2 (checked above); 16-byte loads and stores.
        let reference = |message: &[u8]| unsafe {
            let rk: [__m128i; 11] = std::array::from_fn(|i| super::x86::load(&keys.schedule().0[i]));
            let mut blocks: Vec<[u8; 16]> = message
                .chunks(16)
                .map(|c| {
                    let mut b = [0u8; 16];
                    b[..c.len()].copy_from_slice(c);
                    b
                })
                .collect();
            let whole = !message.is_empty() && message.len().is_multiple_of(16);
            if !whole {
                if blocks.is_empty() {
                    blocks.push([0u8; 16]);
                }
                let last = blocks.last_mut().unwrap();
                last[message.len() % 16] = 0x80;
            }
            let subkey = super::x86::load(&keys.schedule().0[if whole { 11 } else { 12 }]);
            let mut x = _mm_setzero_si128();
            for (i, b) in blocks.iter().enumerate() {
                let mut m = _mm_loadu_si128(b.as_ptr().cast());
                if i == blocks.len() - 1 {
                    m = _mm_xor_si128(m, subkey);
                }
                x = super::x86::encrypt(&rk, _mm_xor_si128(x, m));
            }
            let mut out = [0u8; 16];
            _mm_storeu_si128(out.as_mut_ptr().cast(), x);
            (u64::from_le_bytes(out[..8].try_into().unwrap()), u64::from_le_bytes(out[8..].try_into().unwrap()))
        };
        let message: Vec<u8> = (0..100u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
        for n in 0..=100 {
            assert_eq!(keys.mac(&message[..n]), reference(&message[..n]), "length {n}");
        }
    }
}
