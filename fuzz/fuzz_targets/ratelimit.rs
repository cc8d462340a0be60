//! Fuzzes `regcache::fuzzing::ratelimit`: the rate-limit and `Retry-After` parsers must not panic and their answers must keep their invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| regcache::fuzzing::ratelimit(data));
