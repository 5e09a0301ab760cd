"""Runs in a venv with only torch + transformers + diffusers: load a run's exports the way a user
would and generate from each. Used by test_exports_mlflow.py; prints one JSON line.

    /tmp/venv/bin/python tests/integration/plain_env_check.py VPIT_DIR DECODER_DIR OUT_DIR
"""

import importlib.util
import json
import sys
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from transformers import AutoModelForCausalLM, AutoTokenizer

vpit_dir, decoder_dir, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
assert importlib.util.find_spec("metamorph") is None, "this check must run without metamorph installed"

model = AutoModelForCausalLM.from_pretrained(vpit_dir, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(vpit_dir, trust_remote_code=True)  # it reads config.json (auto_map) too
start = tok.convert_tokens_to_ids("<image_start>")

# text -> image: the prompt ends in <image_start>, so the model draws N visual tokens, then writes
prompt = tok.apply_chat_template([{"role": "user", "content": "Generate an image of a red circle."}],
                                 add_generation_prompt=True, return_dict=False)
drawn = model.generate(torch.tensor([prompt + [start]]), max_new_tokens=8, return_dict_in_generate=True)

# image -> text: the drawn tokens as the prompt image (visual positions = the template's pad ids)
q = tok.apply_chat_template([{"role": "user", "content": "<image>\nWhat colour is the object?"}],
                            add_generation_prompt=True, return_dict=False)
visual = [t == tok.pad_token_id for t in q]
answer = model.generate(torch.tensor([q]), visual_mask=torch.tensor([visual]),
                        vision_feats=drawn.visual_tokens[0], max_new_tokens=8, max_images=0,
                        return_dict_in_generate=True)

pipe = DiffusionPipeline.from_pretrained(decoder_dir, trust_remote_code=True)
image = pipe(drawn.visual_tokens, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
image.save(out_dir / "generated.png")

print(json.dumps({
    "model_class": f"{type(model).__module__}.{type(model).__name__}",
    "pipeline_class": f"{type(pipe).__module__}.{type(pipe).__name__}",
    "visual_tokens": list(drawn.visual_tokens.shape),
    "token_norms": drawn.visual_tokens.norm(dim=-1).flatten().tolist(),
    "drawn_text": tok.decode(drawn.sequences[0, len(prompt) + 1:], skip_special_tokens=True),
    "answer_ids": answer.sequences[0, len(q):].tolist(),
    "answer_stopped": bool(answer.stopped),
    "eos_token_id": model.generation_config.eos_token_id,
    "n_visual_prompt": sum(visual),
    "image_size": list(image.size),
}))
