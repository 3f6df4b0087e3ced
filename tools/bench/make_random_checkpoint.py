#!/usr/bin/env python3
"""Save a random-weight Blip2ForConditionalGeneration checkpoint of a benchmark shape, for
`blip2 serve all --model DIR` under load (`blip2 bench load`).

    /opt/venv-ref/bin/python tools/bench/make_random_checkpoint.py --shape base --out target/bench/base

Weights: transformers' own initialisation (normal, std 0.02), seeded; values do not change the
arithmetic, only what the greedy answers say. About 1.3 GB at "base" (f32 safetensors); the
"opt-2.7b" shape would be about 15 GB, so the load benchmark serves "base" only.

Tokenizer: the small byte-level BPE of tests/fixtures/models/opt-a (448 tokens + `<image>` at
448), its vocabulary padded with tokens `Ġw<id>` up to the model's 50272 rows so that every id
decodes. Prompts tokenize as the fixture's tokenizer does (more tokens per word than GPT-2's
vocabulary); answers use only the fixture's plain words (see keep_only_words), so that the session
tier streams a non-empty text piece per token and a later turn's prompt re-tokenizes the answer
to the ids generated, as the prefix cache needs.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "models" / "opt-a"


def padded_tokenizer(vocab_size: int) -> dict:
    tokenizer = json.loads((FIXTURE / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    taken = set(vocab.values()) | {t["id"] for t in tokenizer["added_tokens"]}
    if max(taken) + 1 > vocab_size:
        raise SystemExit(f"the fixture tokenizer has {max(taken) + 1} ids, more than {vocab_size}")
    # Added tokens that the model's vocabulary lacks get the id after its last one when loaded:
    # put them in the vocabulary at their own ids so that `<image>` keeps id 448.
    for t in tokenizer["added_tokens"]:
        vocab.setdefault(t["content"], t["id"])
    for i in range(vocab_size):
        if i not in taken:
            vocab[f"\u0120w{i}"] = i
    return tokenizer


def keep_only_words(model, tokenizer: dict) -> None:
    """Zeroes the (tied) embedding rows of every id but the fixture tokenizer's plain words, so
    that greedy decoding picks only those: a random row's logit beats 0 for one of ~400 words
    with certainty. Then an answer, put back into the next turn's prompt as text, tokenizes to
    (nearly) the same ids as generated, as with a real tokenizer, and the LLM tier's prefix cache
    can reuse it; a padding token `w<id>` or a byte fragment would tokenize differently. It also
    keeps `<image>` and special tokens out of answers. The arithmetic is unchanged: every row is
    still multiplied."""
    from tokenizers import Tokenizer

    decoder = Tokenizer.from_str(json.dumps(tokenizer))
    special = {t["id"] for t in tokenizer["added_tokens"]}
    fixture_ids = set(json.loads((FIXTURE / "tokenizer.json").read_text())["model"]["vocab"].values())
    words = [
        i for i in sorted(fixture_ids - special)
        if (text := decoder.decode([i])) and "\ufffd" not in text
    ]
    embeddings = model.language_model.get_input_embeddings().weight
    keep = torch.zeros(embeddings.shape[0], dtype=torch.bool)
    keep[words] = True
    with torch.no_grad():
        embeddings[~keep] = 0.0
    if model.language_model.get_output_embeddings().weight.data_ptr() != embeddings.data_ptr():
        raise SystemExit("lm_head is not tied to embed_tokens: zeroing would not restrict answers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="base", choices=["base", "opt-2.7b"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    from transformers import Blip2ForConditionalGeneration

    config = shapes.config(args.shape)
    model = Blip2ForConditionalGeneration(config).eval()
    tokenizer = padded_tokenizer(config.text_config.vocab_size)
    keep_only_words(model, tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)

    (args.out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    shutil.copy(FIXTURE / "tokenizer_config.json", args.out / "tokenizer_config.json")
    processor = json.loads((FIXTURE / "processor_config.json").read_text())
    size = config.vision_config.image_size
    processor["image_processor"]["size"] = {"height": size, "width": size}
    processor["num_query_tokens"] = config.num_query_tokens
    (args.out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    print(f"saved a random {args.shape} checkpoint to {args.out}")


if __name__ == "__main__":
    main()
