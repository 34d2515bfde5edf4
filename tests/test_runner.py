"""The one-layer runner reproduces transformers' full forward, layer by layer."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from streammerge.arch import ARCHITECTURES
from streammerge.model import Model
from streammerge.runner import LayerRunner
from tiny_models import FAMILIES, MORE_FAMILIES, VISION


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


ALL_FAMILIES = sorted(set(FAMILIES) | {f for f in MORE_FAMILIES if f in ARCHITECTURES})


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_an_expert_on_every_token_is_the_eager_forward_bit_for_bit(tiny_models, name):
    """The statistics run each expert on every token without transformers' routing (whose nonzero and where
    stop the host for the device); that must change no bit of what its own eager forward computes."""
    model = Model.open(tiny_models(name))
    runner = LayerRunner(model.spec, model.config, torch.device("cpu"), torch.float32)
    layer = model.spec.moe_layers(model.config)[0]
    stream = model.spec.moe_block(runner.build(layer, model.read(model.layer_names(layer)))).experts
    x = torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    stream._load(1)
    if model.spec.scaled_input_experts:
        expected = stream.one(x)
    else:
        expected = stream.one(x, torch.zeros(40, 1, dtype=torch.long), torch.ones(40, 1))
    assert torch.equal(stream.every_token(x), expected)
    stream.max_rows = 16  # sub-batched when the device is short of memory
    assert torch.equal(stream.every_token(x), expected)


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_tensors_stay_float32_where_transformers_keeps_them(tiny_models, name):
    """Computing in bfloat16, every layer tensor has the dtype transformers' own model gives it: routers and
    e_score_correction_bias stay float32 where the family's class says so (`_keep_in_fp32_modules_strict`)."""
    model_dir = tiny_models(name)
    model = Model.open(model_dir)
    loader = AutoModelForImageTextToText if name in VISION else AutoModelForCausalLM
    full = loader.from_pretrained(model_dir, dtype=torch.bfloat16)
    runner = LayerRunner(model.spec, model.config, torch.device("cpu"), torch.bfloat16)
    for layer in range(model.config.num_hidden_layers):
        ours = runner.build(layer, model.read(model.layer_names(layer)))
        theirs = full.get_submodule(model.spec.layer_prefix(layer).rstrip("."))
        expected = {n: t.dtype for n, t in [*theirs.named_parameters(), *theirs.named_buffers()]}
        got = {n: t.dtype for n, t in [*ours.named_parameters(), *ours.named_buffers()]}
        assert got == {n: expected[n] for n in got}, layer
        kept = {n for n, dtype in expected.items() if dtype == torch.float32}
        assert kept <= {n for n, dtype in got.items() if dtype == torch.float32} | {
            n for n in kept if ".experts." in f".{n}"}, layer


def test_an_unrouted_token_infinity_stays_out_of_the_routed_sum(tiny_models, monkeypatch):
    """float16 overflows to inf easily; an expert's output on a token not routed to it has gate 0, and
    inf × 0 would make that token's sum NaN."""
    from streammerge.routed import RoutedTokens
    from streammerge.runner import ExpertStream

    model = Model.open(tiny_models("mixtral"))
    runner = LayerRunner(model.spec, model.config, torch.device("cpu"), torch.float16)
    stream = model.spec.moe_block(runner.build(0, model.read(model.layer_names(0)))).experts
    experts, tokens = len(stream.experts), RoutedTokens(len(stream.experts), torch.device("cpu"))
    index = torch.stack([torch.arange(12) % experts, (torch.arange(12) + 1) % experts], -1)
    tokens.add(torch.ones(12, model.config.hidden_size, dtype=torch.float16), index, torch.full((12, 2), 0.5))

    def every_token(self, x):  # 1 on the expert's routed tokens, inf elsewhere
        expert = self.buffers["loaded"][1]
        return torch.where((index == expert).any(-1, keepdim=True), 1.0, torch.inf).to(x.dtype).expand_as(x)

    monkeypatch.setattr(ExpertStream, "every_token", every_token)
    combined = stream.sweep(tokens, lambda expert, c, chunk, y, down_inputs: None)
    assert torch.equal(combined[0], torch.ones(12, model.config.hidden_size, dtype=torch.float16))



def test_a_stream_built_after_another_was_freed_loads_its_own_experts(tiny_models):
    """The layers' streams share the expert buffers, which remember which stream's expert they hold. A stream
    built right after another was freed takes the freed one's memory, hence its id() in CPython; it must still
    load its own expert 1, not take the freed stream's (the compressed candidates of a layer are built one after
    another, the same expert index another expert)."""
    from streammerge.runner import ExpertStream

    model = Model.open(tiny_models("mixtral"))
    runner = LayerRunner(model.spec, model.config, torch.device("cpu"), torch.float32)
    layer = model.spec.moe_layers(model.config)[0]
    freed = model.spec.moe_block(runner.build(layer, model.read(model.layer_names(layer)))).experts
    x = torch.randn(8, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        freed.output(1, x)
        experts_class, experts = type(freed.one), freed.experts[::-1]  # its expert 1 is another one
        del freed
        stream = ExpertStream(experts_class, model.spec, runner.config, experts, torch.device("cpu"), torch.float32,
                              runner._expert_buffers)
        got = stream.output(1, x)
        stream._load(1)
        assert torch.equal(got, stream.every_token(x))
