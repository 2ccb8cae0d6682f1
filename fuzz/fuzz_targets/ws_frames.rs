//! WebSocket frames from clients: arbitrary bytes, fed in the pieces the first byte picks,
//! give events or a close code, never a panic, and a frame never claims more than it read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pushhub::transport::ws::frame::FrameReader;

fuzz_target!(|input: &[u8]| {
    let Some((&piece, bytes)) = input.split_first() else {
        return;
    };
    let piece = usize::from(piece).max(1);
    let mut reader = FrameReader::new(4096);
    let mut buffer = Vec::new();
    for chunk in bytes.chunks(piece) {
        buffer.extend_from_slice(chunk);
        loop {
            match reader.next(&buffer) {
                Ok(Some((used, _event))) => {
                    assert!(used > 0 && used <= buffer.len());
                    buffer.drain(..used);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
