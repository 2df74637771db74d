#!/usr/bin/env bash
# rustdoc as docs.rs runs it, on the pinned stable: nightly's `doc_cfg` (which the crates ask
# for under `--cfg docsrs`) allowed through RUSTC_BOOTSTRAP for rustdoc alone, so that the
# dependencies' checks are rustc's as every other build of scripts/test.sh makes them (given
# to rustc, RUSTC_BOOTSTRAP changes the fingerprints of the crates whose build scripts read it,
# and those are checked again). Used as `RUSTDOC=scripts/rustdoc-docsrs.sh cargo doc`.
RUSTC_BOOTSTRAP=1 exec rustdoc "$@"
