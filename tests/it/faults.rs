//! Fault injection and protocol edge cases against the in-process fake upstream.
