//! Any bytes as the body of both generation endpoints: parsing and validation never panic,
//! and every answer is one of the documented ones (see `sd35_api::properties`).
#![no_main]

libfuzzer_sys::fuzz_target!(|body: &[u8]| {
    sd35_api::properties::request(body);
});
