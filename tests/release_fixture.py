"""Tiny Hugging Face release folders with the released file layout, built locally (no model hub here).

    .venv/bin/python tests/release_fixture.py --kind llada --out /tmp/tiny-llada-instruct
    .venv/bin/python tests/release_fixture.py --kind dream --out /tmp/tiny-dream-instruct [--dtype bfloat16]

`make_release(kind, out)` writes what `GSAI-ML/LLaDA-8B-Instruct` / `Dream-org/Dream-v0-Instruct-7B` ship, at toy size:
`config.json` (the family's field names and token ids), `generation_config.json`, `model.safetensors` (the released
tensor names, random weights), `tokenizer.json` (a byte-level BPE trained here on generated text, plus the family's
special tokens: LLaDA's `<|startoftext|>`, `<|eot_id|>`, `<|start_header_id|>`, `<|mdm_mask|>` ...; Dream's
`<|im_start|>`, `<|im_end|>`, `<|mask|>` ...), `tokenizer_config.json` (special tokens by name, `added_tokens_decoder`
and a chat template of the family's shape: Llama-3-style headers for LLaDA, ChatML with a default system message for
Dream) and `special_tokens_map.json`. `transformers.AutoTokenizer.from_pretrained(out)` loads it.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLADA_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

DREAM_TEMPLATE = """{%- if messages[0]['role'] != 'system' %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Per family: special tokens in id order (after the BPE vocabulary), the named ones, the template, the model.
FAMILIES = {
    "llada": {
        "specials": ["<|startoftext|>", "<|endoftext|>", "<|reserved_token_0|>", "<|reserved_token_1|>",
                     "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "named": {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        "mask": "<|mdm_mask|>", "template": LLADA_TEMPLATE,
        "model": dict(arch="llada", d_model=64, n_layers=2, n_heads=4, mlp_hidden=128, rope_theta=500000.0),
    },
    "dream": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"],
        "named": {"bos_token": "<|beginoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        "mask": "<|mask|>", "template": DREAM_TEMPLATE,
        "model": dict(arch="dream", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=128,
                      qkv_bias=True, rope_theta=10000.0),
    },
}
WORDS = ("the model writes a short answer to every question about cats dogs rivers and mountains while its "
         "blocks are denoised in parallel from left to right capital city france paris berlin rome what is how "
         "many why does one two three four five six seven eight nine ten").split()


def _corpus(n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return lines


def make_tokenizer(specials: list[str], vocab_size: int = 320):
    """A byte-level BPE trained on generated text, then the special tokens (ids right after the BPE vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens(specials)
    return tok


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def make_release(kind: str, out: str | Path, *, dtype: str = "float32", seed: int = 0) -> Path:
    """Write a tiny `kind` ("llada" or "dream") release folder at `out` (a new or empty folder)."""
    import jax

    from dlmjax.config import ModelConfig
    from dlmjax.interchange import get_module
    from dlmjax.interchange.safetensors_io import write_safetensors
    from dlmjax.models.transformer import init_params

    family = FAMILIES[kind]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    tok = make_tokenizer(family["specials"])
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in family["specials"]}
    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    vocab = -(-n_tokens // 64) * 64  # padded embedding rows, as the releases pad theirs
    meta = {"mask_id": ids[family["mask"]], "eos_id": ids[family["named"]["eos_token"]],
            "pad_id": ids[family["named"]["pad_token"]], "bos_id": ids[family["named"]["bos_token"]]}

    config = {"add_bos_token": False, "add_eos_token": False,
              "added_tokens_decoder": {str(ids[t]): _added_token(t) for t in family["specials"]},
              **family["named"], "chat_template": family["template"], "clean_up_tokenization_spaces": False,
              "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {name: {k: v for k, v in _added_token(text).items() if k != "special"}
                   for name, text in family["named"].items()}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")

    model_cfg = ModelConfig(vocab_size=vocab, max_seq_len=4096, init_std=0.3, param_dtype=dtype,
                            **family["model"])
    params = init_params(model_cfg, jax.random.PRNGKey(seed))
    module = get_module(kind)
    tensors = {name: np.asarray(a) for name, a in module.to_hf(params, model_cfg, kind).items()}
    st = "BF16" if dtype == "bfloat16" else "F32"
    write_safetensors(out / "model.safetensors", [(n, st, tuple(a.shape)) for n, a in tensors.items()],
                      lambda n: np.asarray(tensors[n]).astype(np.float32 if st == "F32" else tensors[n].dtype),
                      {"format": "pt"})
    hf_config = module.hf_config(model_cfg, meta)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    generation = {"bos_token_id": meta["bos_id"], "eos_token_id": meta["eos_id"], "pad_token_id": meta["pad_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=sorted(FAMILIES), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args(argv)
    print(make_release(args.kind, args.out, dtype=args.dtype))


if __name__ == "__main__":
    main()
