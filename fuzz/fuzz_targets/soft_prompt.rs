//! Untrusted `SoftPrompt` messages (protobuf bytes) through the wire decoder: a tensor of the
//! expected shape or an error, never a panic.
#![no_main]

use blip2_proto::v1::SoftPrompt;
use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|bytes: &[u8]| {
    let Ok(prompt) = SoftPrompt::decode(bytes) else {
        return;
    };
    if let Ok(tensor) = blip2_common::soft_prompt::decode(&prompt, [4, 8], &Device::Cpu) {
        assert_eq!(tensor.dims(), [4, 8]);
    }
});
