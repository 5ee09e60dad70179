"""A tiny random Llama with its own tokenizer, built locally: a model vLLM can serve here.

No model hub is reachable from this machine, so the vLLM tests and ``loadsvc bench
vllm`` build one: a byte-level BPE tokenizer trained on a few sentences and a
two-layer ``LlamaForCausalLM`` with random weights (about 0.5 MB, a few seconds).
It answers with nonsense, at the speed of a real (if small) model on vLLM's
CPU backend, which is all a load test needs.

    python -m loadsvc.bench.tiny_llama DIR     # needs transformers and tokenizers (vLLM has both)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["build"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Per-rank load goes from inference engines to the routers that pick a rank.",
    "A scheduler runs requests in batches and queues the rest until there is room.",
    "Routers send each request where it should finish soonest.",
    "Hello, how are you today? I am fine, thank you, and you?",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
]
_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>{% endif %}")
_MARKER = "loadsvc-tiny-llama.json"


def build(directory: str | Path, *, vocab_size: int = 512, seed: int = 0) -> Path:
    """Write the tokenizer and model into directory (kept if already built); return it."""
    out = Path(directory)
    if (out / _MARKER).exists():
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS * 4, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.chat_template = _CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=len(fast),
                         max_position_embeddings=512, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    LlamaForCausalLM(config).save_pretrained(out)
    (out / _MARKER).write_text(json.dumps({"vocab_size": len(fast), "seed": seed}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="where to write the model (kept if built)")
    print(build(parser.parse_args().directory))


if __name__ == "__main__":
    main()
