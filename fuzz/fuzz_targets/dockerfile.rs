//! Fuzzes `regcache::fuzzing::dockerfile`: the parser must not panic and its answer must keep its invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| regcache::fuzzing::dockerfile(data));
