//! Untrusted `GenerateSetup` messages (protobuf bytes) through the LLM tier's checks and the
//! tokenizer, on the committed opt-a checkpoint: a prompt length or a status, never a panic.
#![no_main]

use std::sync::LazyLock;

use blip2_model::model::{Blip2Model, LoadOptions};
use blip2_proto::v1::GenerateSetup;
use libfuzzer_sys::fuzz_target;
use prost::Message;

static MODEL: LazyLock<Blip2Model> = LazyLock::new(|| {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/models/opt-a"
    );
    match Blip2Model::load(std::path::Path::new(dir), &LoadOptions::default()) {
        Ok(model) => model,
        Err(e) => panic!("loading the fixture checkpoint: {e}"),
    }
});

fuzz_target!(|bytes: &[u8]| {
    let Ok(setup) = GenerateSetup::decode(bytes) else {
        return;
    };
    if let Err(status) = blip2_llm::check_setup(&setup, &MODEL, 512) {
        assert!(
            matches!(
                status.code(),
                tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
            ),
            "{status:?}"
        );
    }
});
