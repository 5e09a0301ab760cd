"""Small random-weight checkpoints in the real Hugging Face formats, for the `rehearsal` preset.

    metamorph make-checkpoints /tmp/mm-ckpts        # or: python -m metamorph.checkpoints /tmp/mm-ckpts

The cluster preset loads three checkpoints by path; the rehearsal loads stand-ins that have the
same files, classes and special tokens, only small and random, so the code path that reads
them (config.json, safetensors, tokenizer.json + tokenizer_config.json with its chat template,
diffusers subfolders) is the one a cluster run takes:

* ``llm/``: a ``LlamaForCausalLM`` (Llama-3.1 architecture: GQA, RoPE theta 500k, untied head),
  saved in bf16 like Meta's, with a Llama-3-style tokenizer: a byte-level BPE on Llama-3's split
  regex trained here on toy-world text, then Llama-3.1's 256 special tokens appended after the
  BPE ids in Meta's order (``<|begin_of_text|>``, ``<|end_of_text|>``,
  ``<|finetune_right_pad_id|>``, ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eom_id|>``,
  ``<|eot_id|>``, ``<|python_tag|>``, reserved ones), no pad token, eos ``<|eot_id|>``, and the
  Instruct chat template (system header with the knowledge-cutoff lines, one header per turn).
  The image tokens are NOT in it: ``tokenize`` appends them, as it does for Meta's checkpoint.
* ``siglip/``: a ``SiglipModel`` (vision + text towers, as google/siglip-so400m-patch14-384 is
  published) and its ``preprocessor_config.json``.
* ``sd/``: Stable Diffusion 1.5's layout: ``unet/`` (UNet2DConditionModel with SD's block types
  and 4 latent channels), ``vae/`` (AutoencoderKL, 8x downsampling, scaling 0.18215),
  ``scheduler/`` (SD's PNDM config) and a ``model_index.json`` naming them.

Nothing is downloaded; the same seed writes the same weights.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

LLAMA3_NAMED = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
# Llama-3.1's 256 special tokens: the named ones, then reserved 3..247 (ids 128000..128255 there)
LLAMA3_SPECIALS = LLAMA3_NAMED + tuple(f"<|reserved_special_token_{i}|>" for i in range(3, 248))

# Llama-3.1-Instruct's chat template, without the tool-calling branches: a system header always
# comes first (with the knowledge-cutoff lines), then one header per turn, each ending <|eot_id|>.
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = \"\" %}{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}"
    "{{- system_message }}{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}\n"
)


def _toy_corpus() -> list[str]:
    """English of the toy world's kind (attributes, question and caption templates)."""
    from metamorph.world import attributes as A
    from metamorph.world import text as T

    words = [*A.SHAPES, *A.COLOURS, *A.BACKGROUNDS, *A.SIZES, *A.POSITIONS]
    lines = [T.SHORT_ANSWER, T.MC_ANSWER, *T.CAPTION_TEMPLATES, *T.COLOUR_Q, *T.SHAPE_Q, *T.COUNT_Q,
             *T.POSITION_Q, *T.SIZE_Q, *T.DIRECTION_Q, "user", "assistant", "system", "\n\n",
             "Cutting Knowledge Date: December 2023", "Today Date: 26 Jul 2024"]
    lines = [str(x) for x in lines]
    return lines * 4 + [" ".join(words)] * 8 + [f"{w} {v}" for w in words for v in ("0", "1", "2", "3")]


def make_tokenizer(out: Path, vocab_size: int = 1024):
    """A Llama-3-style tokenizer (see the module doc) saved to ``out``; returns it."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from metamorph.data.tokenizer import LLAMA3_SPLIT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_toy_corpus(), trainer)
    # appended after the BPE ids, in Meta's order, as Llama-3 does (128000.. there)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   model_max_length=131072, clean_up_tokenization_spaces=True)
    fast.chat_template = LLAMA31_CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def make_llm(out: Path, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
             intermediate: int = 176) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(out)
    vocab = tok.get_vocab()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
        bos_token_id=vocab["<|begin_of_text|>"],
        eos_token_id=[vocab["<|end_of_text|>"], vocab["<|eom_id|>"], vocab["<|eot_id|>"]],
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)  # Meta ships bf16
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, do_sample=True,
                     temperature=0.6, top_p=0.9).save_pretrained(out)


def make_siglip(out: Path, seed: int = 0, image_size: int = 64, patch_size: int = 4, hidden: int = 96,
                layers: int = 2, heads: int = 4, intermediate: int = 192) -> None:
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    cfg = SiglipConfig(
        text_config={"vocab_size": 256, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "hidden_size": hidden, "num_hidden_layers": 1, "num_attention_heads": heads,
                     "intermediate_size": intermediate, "max_position_embeddings": 16},
        vision_config={"image_size": image_size, "patch_size": patch_size, "hidden_size": hidden,
                       "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": intermediate},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiglipModel(cfg)
    model.save_pretrained(out, safe_serialization=True)
    SiglipImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(out)


def make_sd(out: Path, seed: int = 0, image_size: int = 64, cross_attention_dim: int = 32) -> None:
    """SD-1.5 layout: 4 UNet levels (3 cross-attention, 1 plain), 2 layers each, 4 latent channels."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=image_size // 8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size, layers_per_block=1,
            block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.18215,
        )
    unet.save_pretrained(out / "unet", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    # Stable Diffusion 1.5's own scheduler config
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
        "scheduler": ["diffusers", "PNDMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2))


def make_checkpoints(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write ``llm/``, ``siglip/`` and ``sd/`` under ``root``; returns their paths."""
    root = Path(root)
    paths = {"llm": root / "llm", "siglip": root / "siglip", "sd": root / "sd"}
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
    make_llm(paths["llm"], seed)
    make_siglip(paths["siglip"], seed)
    make_sd(paths["sd"], seed)
    log.info("checkpoints written under %s", root)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for name, p in make_checkpoints(args.out, args.seed).items():
        print(f"{name}: {p}")


if __name__ == "__main__":
    main()
