//! What the agent and the host read from each other: length-prefixed frames, decoded as
//! requests (the agent's side) and as responses (the host's side). A compromised guest writes
//! anything on its end of the vsock connection. Any panic, unbounded allocation or hang is a
//! finding; bad input must be an error.
#![no_main]

use ember_agent::protocol::{decode, decode_id, read_frame, Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = data;
    // A stream holds at most data.len() / 4 frames; stop at the first error or the end.
    while let Ok(Some(payload)) = read_frame(&mut reader) {
        let _ = decode::<Request>(&payload);
        let _ = decode::<Response>(&payload);
        let _ = decode_id(&payload);
    }
});
