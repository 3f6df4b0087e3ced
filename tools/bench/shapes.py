"""The benchmark shapes, as transformers configs: the same dims as `blip2 bench --shape`
(services/server/src/bench.rs), so both sides run the same arithmetic.

"base": ViT-B/14 at 224 px, the real Q-Former (BERT-base dims, 32 queries), OPT-125m dims with
the vocabulary of the released OPT checkpoints (50272). "opt-2.7b": the released
Salesforce/blip2-opt-2.7b dims (ViT-g/14 at 224 px, OPT-2.7B).
"""

from transformers import Blip2Config

# The `<image>` token of the tokenizer copied from tests/fixtures/models/opt-a (an added token).
IMAGE_TOKEN_INDEX = 448
VOCAB_SIZE = 50272


def config(shape: str) -> Blip2Config:
    if shape == "base":
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, image_size=224, patch_size=14)
        text = dict(model_type="opt", hidden_size=768, num_hidden_layers=12,
                    num_attention_heads=12, ffn_dim=3072, vocab_size=VOCAB_SIZE,
                    word_embed_proj_dim=768, max_position_embeddings=2048)
    elif shape == "opt-2.7b":
        # Blip2VisionConfig's defaults are ViT-g/14 (1408 hidden, 39 layers, 224 px).
        vision = dict()
        text = dict(model_type="opt", hidden_size=2560, num_hidden_layers=32,
                    num_attention_heads=32, ffn_dim=10240, vocab_size=VOCAB_SIZE,
                    word_embed_proj_dim=2560, max_position_embeddings=2048)
    else:
        raise ValueError(f"unknown shape {shape!r} (base, opt-2.7b)")
    text.update(bos_token_id=2, eos_token_id=2, pad_token_id=1, do_layer_norm_before=True,
                tie_word_embeddings=True)
    return Blip2Config(vision_config=vision, qformer_config={}, text_config=text,
                       num_query_tokens=32, image_token_index=IMAGE_TOKEN_INDEX)
