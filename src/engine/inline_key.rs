//! API keys stored in the map entry itself when short (most keys are), so a lookup confirms
//! the key without a second cache miss.

use std::{borrow::Borrow, hash::Hash};

const INLINE: usize = 54;

#[derive(Clone)]
pub(crate) enum InlineKey {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl From<&[u8]> for InlineKey {
    fn from(key: &[u8]) -> Self {
        if key.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..key.len()].copy_from_slice(key);
            InlineKey::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            InlineKey::Heap(key.into())
        }
    }
}

impl Borrow<[u8]> for InlineKey {
    #[inline]
    fn borrow(&self) -> &[u8] {
        match self {
            InlineKey::Inline { len, bytes } => &bytes[..usize::from(*len)],
            InlineKey::Heap(b) => b,
        }
    }
}

// Hash and Eq must agree with those of `[u8]`, for lookups by `&[u8]`.
impl Hash for InlineKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        Borrow::<[u8]>::borrow(self).hash(state);
    }
}

impl PartialEq for InlineKey {
    fn eq(&self, other: &Self) -> bool {
        Borrow::<[u8]>::borrow(self) == Borrow::<[u8]>::borrow(other)
    }
}

impl Eq for InlineKey {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn short_and_long_keys_hash_and_compare_as_bytes() {
        let s = foldhash::fast::RandomState::default();
        for key in [
            &b"short"[..],
            &[b'k'; 200][..],
            &[b'x'; INLINE][..],
            &[b'y'; INLINE + 1][..],
        ] {
            let k = InlineKey::from(key);
            assert_eq!(s.hash_one(&k), s.hash_one(key));
            assert_eq!(Borrow::<[u8]>::borrow(&k), key);
            assert!(matches!(k, InlineKey::Inline { .. }) == (key.len() <= INLINE));
        }
    }
}
