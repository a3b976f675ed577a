//! The snapshot state decoder (`state.bin`, also a migration's state): any bytes give a state or
//! an error, never a panic. Each input is tried as a whole file and, so that the JSON decoder is
//! reached past the CRC, as a body behind a valid header.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vmm::snapshot::{decode_state, MAGIC, VERSION};

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("state.bin");
    let _ = decode_state(path, data);
    let mut framed = Vec::with_capacity(26 + data.len());
    framed.extend_from_slice(&MAGIC);
    for v in VERSION {
        framed.extend_from_slice(&v.to_le_bytes());
    }
    framed.extend_from_slice(&(data.len() as u64).to_le_bytes());
    framed.extend_from_slice(&crc(data).to_le_bytes());
    framed.extend_from_slice(data);
    let _ = decode_state(path, &framed);
});

/// CRC-32 (IEEE), as `crc32fast` computes it, without depending on it here.
fn crc(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}
