"""The one-layer runner reproduces transformers' full forward, layer by layer."""

import torch
from transformers import AutoModelForCausalLM

from streammerge.model import Model
from streammerge.runner import LayerRunner


def test_layers_match_full_forward(tiny_models, family):
    model_dir = tiny_models(family)
    model = Model.open(model_dir)
    tokens = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = full(tokens, output_hidden_states=True).hidden_states
    runner = LayerRunner(model.spec, model.config, torch.device("cpu"), torch.float32)
    hidden = torch.nn.functional.embedding(tokens, model.reader.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"])
    for layer in range(model.config.num_hidden_layers):
        module = runner.build(layer, model.reader.read(model.layer_names(layer)))
        hidden = runner.forward(module, layer, hidden)
        last = layer == model.config.num_hidden_layers - 1
        got = full.model.norm(hidden) if last else hidden  # transformers' last hidden state is normed
        assert (got - expected[layer + 1]).abs().max().item() <= 1e-5, f"layer {layer}"
