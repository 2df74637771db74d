//! Randomness from the operating system, for ids that must differ between processes.

/// A random `u64` from the operating system. Not `RandomState`: its keys live in a
/// thread-local drawn once and then counted up, so copies of one SnapStart snapshot (or of a
/// forked process) would draw the same values after the copy.
pub(crate) fn draw_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_ok() {
        return u64::from_ne_bytes(bytes);
    }
    // No OS randomness (never seen on the platforms Lambda runs): mix the time in.
    use std::hash::BuildHasher;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    std::collections::hash_map::RandomState::new().hash_one((now.as_nanos(), std::process::id()))
}
