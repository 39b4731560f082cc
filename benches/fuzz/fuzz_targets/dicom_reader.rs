//! libFuzzer entry point; the harness lives in the library so the replay test runs the same code.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| minisam_fuzz::dicom_reader(data));
