"""Run a trained VPiT model: answer about images, score option letters, predict vision tokens,
render them with the decoder. Shared by the evaluate stage and the ``metamorph generate`` /
``metamorph chat`` commands.

    python -c "from metamorph.eval.inference import VPiTRunner; help(VPiTRunner)"

A ``VPiTRunner`` holds the model, its tokenizer + chat template, the frozen vision encoder and
optionally the decoder. Prompts are rendered with the training chat template
(``metamorph.data.chat``); prompt images are encoded by the encoder and placed at the visual
positions. One sequence at a time (``metamorph.model.generation`` is batch 1).

Tensor names: N visual tokens per image, D vision feature dim, V vocab.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from metamorph.data.chat import ChatTemplate
from metamorph.data.schema import IMAGE_PLACEHOLDER
from metamorph.model.generation import GenerationConfig, GenerationOutput, Prompt, prompt_embeds

Conversation = Sequence[dict[str, str]]


def open_image(data: bytes | Image.Image | str | Path) -> Image.Image:
    if isinstance(data, Image.Image):
        return data.convert("RGB")
    if isinstance(data, (str, Path)):
        with Image.open(data) as im:
            return im.convert("RGB")
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def normalise_answer(text: str) -> str:
    """Canonical form for exact match: lowercase, single spaces, no surrounding punctuation."""
    return " ".join(text.strip().lower().split()).strip(" .,!?;:\"'")


def drop_instruction(conversation: Conversation) -> list[dict[str, str]]:
    """The unconditional prompt for visual-token CFG: the last user turn keeps only its images."""
    conv = [dict(t) for t in conversation]
    last = conv[-1]
    last["content"] = IMAGE_PLACEHOLDER * last["content"].count(IMAGE_PLACEHOLDER)
    return conv


@dataclass
class TokenPrediction:
    """Vision tokens the model predicted for one prompt, and what else it said."""

    tokens: list[torch.Tensor]  # one [N, D] unit-norm float32 per generated image
    text: str  # decoded text (special tokens and visual steps left out)
    output: GenerationOutput


class VPiTRunner:
    def __init__(self, model, tokenizer, encoder, decoder=None, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.encoder = encoder.to(self.device)
        self.decoder = decoder.to(self.device) if decoder is not None else None
        n = model.config.n_tokens
        if encoder.n_tokens != n or encoder.feature_dim != model.config.vision_dim:
            raise ValueError(
                f"vision encoder gives {encoder.n_tokens} x {encoder.feature_dim} tokens, the model expects "
                f"{n} x {model.config.vision_dim}: pair the model with the encoder it was trained on"
            )
        self.template = ChatTemplate(tokenizer, n)
        self.ids = self.template.ids
        if (self.ids.image_start, self.ids.image_end) != tuple(model.special_ids):
            raise ValueError("tokenizer and model disagree on <image_start>/<image_end> ids: use the run's tokenizer")

    # --- loading ------------------------------------------------------------------------------

    @classmethod
    def from_dirs(
        cls,
        model_dir: str | Path,
        tokenizer_dir: str | Path,
        encoder_dir: str | Path,
        decoder_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> "VPiTRunner":
        from transformers import AutoModelForCausalLM

        from metamorph import register_auto_classes
        from metamorph.data.tokenizer import load_tokenizer
        from metamorph.model.vision import VisionEncoder

        decoder = None
        if decoder_dir is not None:
            from metamorph.decoder.pipeline import MetaMorphDecoderPipeline

            decoder = MetaMorphDecoderPipeline.from_pretrained(str(decoder_dir))
        # the path a user takes: the Auto class, no remote code (the classes are registered)
        register_auto_classes()
        hf_model = AutoModelForCausalLM.from_pretrained(str(model_dir))
        return cls(
            hf_model.vpit,
            load_tokenizer(tokenizer_dir),
            VisionEncoder.from_pretrained(encoder_dir),
            decoder,
            device,
        )

    # --- prompts ------------------------------------------------------------------------------

    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """[n, N, D] encoder tokens of images (bytes, paths or PIL)."""
        if not images:
            return torch.zeros(0, self.encoder.n_tokens, self.encoder.feature_dim)
        return self.encoder.encode_images([open_image(im) for im in images]).float().cpu()

    def prompt(
        self,
        conversation: Conversation | str,
        images: Sequence[Any] = (),
        image_feats: Optional[torch.Tensor] = None,
        start_image: bool = False,
        answer_prefix: str = "",
    ) -> Prompt:
        """Render ``conversation`` (ending in a user turn) for generation. ``images`` fill its
        ``<image>`` placeholders in order (or pass their ``image_feats`` [n, N, D]);
        ``answer_prefix`` is text the answer is forced to start with (frame prediction's label);
        ``start_image`` then appends ``<image_start>`` so the model must draw right away."""
        r = self.template.render_prompt(conversation)
        n_img = len(r.image_starts)
        feats = image_feats if image_feats is not None else self.encode_images(images)
        if feats.shape[0] != n_img:
            raise ValueError(f"the prompt has {n_img} <image> placeholders but {feats.shape[0]} images were given")
        ids, vm = list(r.input_ids), list(r.visual_mask)
        if answer_prefix:
            pre = self.template.encode([answer_prefix])[0]
            ids.extend(pre)
            vm.extend([False] * len(pre))
        if start_image:
            ids.append(self.ids.image_start)
            vm.append(False)
        return Prompt(input_ids=ids, visual_mask=vm, vision_feats=feats.reshape(-1, feats.shape[-1]) if n_img else None)

    # --- text ---------------------------------------------------------------------------------

    def decode_text(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()

    def answer(
        self,
        conversation: Conversation | str,
        images: Sequence[Any] = (),
        max_new_tokens: int = 32,
        max_images: int = 0,
        image_feats: Optional[torch.Tensor] = None,
        gen: Optional[GenerationConfig] = None,
    ) -> TokenPrediction:
        """Greedy answer to a conversation (``max_images`` > 0 lets it draw first, as visual
        thinking does)."""
        cfg = gen or GenerationConfig(max_new_tokens=max_new_tokens, max_images=max_images)
        out = self.model.generate(self.prompt(conversation, images, image_feats), cfg, stop_ids=[self.ids.eot])
        return TokenPrediction(tokens=out.images, text=self.decode_text(out.token_ids), output=out)

    def answer_after_image(
        self,
        conversation: Conversation | str,
        images: Sequence[Any],
        response_feats_ND: torch.Tensor,
        max_new_tokens: int = 32,
    ) -> TokenPrediction:
        """Greedy text answer once the answer has *drawn* ``response_feats_ND`` [N, D] (forced, as
        in training: ``<image_start>`` + the N tokens + ``<image_end>``, then free text).

        Visual thinking with the true crop instead of the model's own: how well it reads a crop,
        apart from how well it draws one (``evaluate_qa``'s ``correct_true_crop``)."""
        p = self.prompt(conversation, images, start_image=True)
        n = self.model.config.n_tokens
        if tuple(response_feats_ND.shape) != (n, self.model.config.vision_dim):
            raise ValueError(f"response image is {tuple(response_feats_ND.shape)}, the model draws "
                             f"{n} x {self.model.config.vision_dim}")
        feats = F.normalize(response_feats_ND.float(), dim=-1)
        ids = list(p.input_ids) + [self.ids.pad] * n + [self.ids.image_end]
        vm = list(p.visual_mask) + [True] * n + [False]
        feats_KD = feats if p.vision_feats is None else torch.cat([p.vision_feats.float(), feats])
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, max_images=0)
        out = self.model.generate(Prompt(input_ids=ids, visual_mask=vm, vision_feats=feats_KD), cfg,
                                  stop_ids=[self.ids.eot])
        return TokenPrediction(tokens=[], text=self.decode_text(out.token_ids), output=out)

    @torch.no_grad()
    def next_token_logits(self, prompt: Prompt) -> torch.Tensor:
        """[V] logits of the token right after the prompt (one forward, no cache)."""
        x_1Td = prompt_embeds(self.model, prompt)
        pos_1T = torch.arange(x_1Td.shape[1], device=x_1Td.device)[None]
        h_1Td = self.model.decode(x_1Td, pos_1T)
        return self.model.lm_logits(h_1Td[0, -1]).float().cpu()

    def option_token_ids(self, letters: Sequence[str]) -> list[int]:
        """First token id of each option letter as the model would write it at the answer start."""
        ids = []
        for letter in letters:
            enc = self.template.encode([letter])[0]
            if not enc:
                raise ValueError(f"option letter {letter!r} encodes to no tokens")
            ids.append(enc[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"option letters {list(letters)} share a first token: cannot score by likelihood")
        return ids

    def option_logits(self, conversation: Conversation, images: Sequence[Any], letters: Sequence[str]) -> list[float]:
        """Next-token logit of each option letter at the start of the answer (``tsv.LetterScorer``)."""
        logits_V = self.next_token_logits(self.prompt(conversation, images))
        return [float(logits_V[i]) for i in self.option_token_ids(letters)]

    # --- vision tokens ------------------------------------------------------------------------

    def predict_tokens(
        self,
        conversation: Conversation | str,
        images: Sequence[Any] = (),
        cfg_scale: float = 1.0,
        force_image: bool = True,
        image_feats: Optional[torch.Tensor] = None,
        answer_prefix: str = "",
        max_new_tokens: int = 8,
        max_images: int = 1,
        seed: int = 0,
    ) -> TokenPrediction:
        """The vision tokens the model generates for a prompt. ``force_image`` starts the answer
        with ``answer_prefix`` + ``<image_start>`` (the model's own choice to draw is measured
        separately); ``cfg_scale`` != 1 mixes in the instruction-dropped prompt (visual-token CFG)."""
        feats = image_feats if image_feats is not None else self.encode_images(images)
        prompt = self.prompt(conversation, image_feats=feats, start_image=force_image, answer_prefix=answer_prefix)
        uncond = None
        if cfg_scale != 1.0:
            conv = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else conversation
            uncond = self.prompt(drop_instruction(conv), image_feats=feats, start_image=force_image,
                                 answer_prefix=answer_prefix)
        cfg = GenerationConfig(
            max_new_tokens=max_new_tokens, max_images=max_images, image_cfg_scale=cfg_scale,
            force_image_end=True, seed=seed,
        )
        out = self.model.generate(prompt, cfg, stop_ids=[self.ids.eot], uncond_prompt=uncond)
        return TokenPrediction(tokens=out.images, text=self.decode_text(out.token_ids), output=out)

    def image_start_prob(self, conversation: Conversation | str, images: Sequence[Any] = (),
                         image_feats: Optional[torch.Tensor] = None) -> float:
        """Probability that the model starts its answer with ``<image_start>`` by itself."""
        logits_V = self.next_token_logits(self.prompt(conversation, images, image_feats))
        return float(logits_V.softmax(-1)[self.ids.image_start])

    def render(
        self,
        tokens_BND: torch.Tensor,
        guidance_scale: Optional[float] = None,
        num_inference_steps: Optional[int] = None,
        seed: int = 0,
        batch_size: int = 32,
    ) -> list[Image.Image]:
        """Decode vision tokens [B, N, D] to PIL images (seeded per call, batched)."""
        if self.decoder is None:
            raise ValueError("no decoder loaded: pass a decoder dir to render images")
        tokens_BND = torch.as_tensor(tokens_BND, dtype=torch.float32)
        if tokens_BND.ndim == 2:
            tokens_BND = tokens_BND[None]
        images: list[Image.Image] = []
        g = torch.Generator().manual_seed(seed)
        for i in range(0, tokens_BND.shape[0], batch_size):
            out = self.decoder(
                F.normalize(tokens_BND[i : i + batch_size], dim=-1),
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                generator=g,
            )
            images.extend(out.images)
        return images
