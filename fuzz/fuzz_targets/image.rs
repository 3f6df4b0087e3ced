//! Untrusted image bytes through the processor (size check, header limits, decoder limits,
//! RGB conversion, resize, normalisation): an `Ok` tensor of the right shape or
//! `Error::Image`, never a panic, an abort or an allocation past the limits.
#![no_main]

use blip2_model::processor::{DecodeLimits, ImageProcessor, ImageProcessorConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    // Small limits keep each run fast and make the limit paths reachable.
    let limits = DecodeLimits {
        max_bytes: 1 << 20,
        max_width: 4096,
        max_height: 4096,
        max_pixels: 1 << 22,
        max_alloc: 64 << 20,
    };
    let processor = ImageProcessor::new(ImageProcessorConfig::with_size(16), limits);
    match processor.preprocess(bytes) {
        Ok(pixels) => assert_eq!(pixels.dims(), [3, 16, 16]),
        Err(blip2_model::Error::Image(_)) => {}
        Err(other) => panic!("not an image error: {other:?}"),
    }
});
