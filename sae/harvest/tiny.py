"""Tiny random-weight causal LMs saved as ordinary Hugging Face folders.

For offline smoke runs, tests and examples of the local-folder path: ``save_tiny_model`` builds
a GPT-2, Llama or GPT-NeoX model from a ``transformers`` config (2 layers, d=64 by default),
trains a small byte-level BPE tokenizer on ``pydoc_data.topics``, and writes both with
``save_pretrained``, so ``model.name=<folder>`` loads it like any downloaded model.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("gpt2", "llama", "gpt_neox")


def _tokenizer(family: str, vocab_size: int):
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos = ("<|endoftext|>", "<|endoftext|>") if family != "llama" else ("<s>", "</s>")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=sorted({bos, eos}), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)


def save_tiny_model(folder: str | Path, family: str = "gpt2", *, layers: int = 2, hidden: int = 64,
                    vocab_size: int = 512, seed: int = 0) -> Path:
    """Write a random-weight ``family`` causal LM and its tokenizer to ``folder``; return it.

    Raises:
        ValueError: unknown family.
    """
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; choose one of {FAMILIES}")
    tokenizer = _tokenizer(family, vocab_size)
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    if family == "gpt2":
        config = GPT2Config(n_layer=layers, n_embd=hidden, n_head=4, n_positions=512, **ids)
    elif family == "llama":
        config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **ids)
    else:
        config = GPTNeoXConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=4 * hidden,
                               num_attention_heads=4, max_position_embeddings=512, **ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    """``python -m sae.harvest.tiny FOLDER [--family gpt2] [--layers 2] [--hidden 64]``."""
    import argparse

    p = argparse.ArgumentParser(description="Write a tiny random-weight causal LM (a local Hugging Face folder).")
    p.add_argument("folder")
    p.add_argument("--family", default="gpt2", choices=FAMILIES)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(save_tiny_model(a.folder, a.family, layers=a.layers, hidden=a.hidden, seed=a.seed))


if __name__ == "__main__":
    main()
