//! The VMM's API request parser: any line a client sends gets a request or an error message,
//! never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data) {
        if let Ok(req) = vmm_api::Request::parse(line) {
            // What parses must survive its own round trip.
            let again = serde_json::to_string(&req).expect("a request encodes");
            assert_eq!(
                vmm_api::Request::parse(&again).as_ref(),
                Ok(&req),
                "{again}"
            );
        }
    }
});
