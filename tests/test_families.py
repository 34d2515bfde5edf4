"""Every family beyond the softmax-top-k originals: the layer runner equals the full forward, `run --ratio 0.5`
writes a strictly loadable checkpoint with half the experts in the input's layout, and the routing the
statistics count is exactly what transformers' own router returns."""

import json

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from streammerge.arch import ARCHITECTURES, families_table
from streammerge.checkpoint import CheckpointReader
from streammerge.errors import InputError, UnsupportedArchitectureError
from streammerge.model import Model
from streammerge.pipeline import Run, RunOptions, run
from streammerge.runner import LayerRunner
from tiny_models import FAMILIES, MORE_FAMILIES, VISION, fp8_blocks

OPTIONS = dict(samples=4, seqlen=16, batch=2, ratio=0.5, device="cpu", method="hcsmoe")
TESTED = sorted(f for f in MORE_FAMILIES if f in ARCHITECTURES)
LLAMA4_VL_FORWARD_BROKEN = Version(transformers.__version__) >= Version("5.24")


@pytest.fixture(params=TESTED)
def more_family(request):
    return request.param


@pytest.fixture(scope="session")
def halved(compressed_once):
    return lambda family: compressed_once(family, **OPTIONS)


def test_every_table_entry_is_tested():
    assert set(ARCHITECTURES) == set(FAMILIES) | set(TESTED)


def test_layers_match_full_forward(tiny_models, more_family):
    model_dir = tiny_models(more_family)
    model = Model.open(model_dir)
    tokens = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = full(tokens, output_hidden_states=True).hidden_states
    sparse = [i for i, layer in enumerate(full.model.layers) if hasattr(getattr(layer, model.spec.moe_attr, None), "experts")]
    assert model.spec.moe_layers(model.config) == sparse and sparse  # the table's rule = transformers' layers
    runner = LayerRunner(model.spec, model.config, torch.device("cpu"), torch.float32)
    hidden = runner.embed(tokens, model.reader.read([model.spec.embed_name])[model.spec.embed_name])
    for layer in range(model.config.num_hidden_layers):
        module = runner.build(layer, model.reader.read(model.layer_names(layer)))
        hidden = runner.forward(module, layer, hidden)
        last = layer == model.config.num_hidden_layers - 1
        got = _final_norm(full.model)(hidden) if last else hidden  # transformers' last hidden state is normed
        assert (got - expected[layer + 1]).abs().max().item() <= 1e-5, f"layer {layer}"


def _final_norm(base):
    for name in ("norm", "final_layernorm", "embedding_norm"):
        if hasattr(base, name):
            return getattr(base, name)
    raise AssertionError("no final norm")


def _router_module(spec, block):
    """transformers' router inside a MoE block: the module on the router weight's path returning a tuple."""
    path = dict(spec.renames).get(spec.router, spec.router).removesuffix(".weight").split(".")
    return [block.get_submodule(".".join(path[:i])) for i in range(len(path), 0, -1)]


def test_routing_statistics_equal_router_outputs(tiny_models, more_family, tmp_path):
    model_dir = tiny_models(more_family)
    state = Run(model_dir, tmp_path / "out", RunOptions(**OPTIONS))
    state.journal.open(state.signature_fields(), state.output_files(), state.num_layers, restart=False)
    state.embed()
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    chosen = {}

    def hook(layer):
        def record(module, args, out):
            if isinstance(out, tuple) and len(out) == 3:  # (logits, top-k weights, top-k indices)
                chosen.setdefault(layer, []).append(out[2])
            elif isinstance(out, tuple) and len(out) == 2:  # llama4: (scores, logits), top-k of the logits
                chosen.setdefault(layer, []).append(out[1].topk(module.top_k, dim=-1).indices)
        return record

    for layer in state.moe_layers:
        for module in _router_module(state.spec, state.spec.moe_block(full.model.layers[layer])):
            module.register_forward_hook(hook(layer))
    with torch.no_grad():
        for rows in state.chunks:
            full(state.tokens[rows.start:rows.stop])
    for layer in range(state.num_layers):
        module = state.runner.build(layer, state.model.reader.read(state.model.layer_names(layer)))
        if layer in state.moe_layers:
            stats, _ = state.measure(layer, module, state.hidden(layer), state.hidden(layer + 1))
            expected = torch.bincount(torch.cat(chosen[layer]).flatten(), minlength=state.num_experts)
            assert torch.equal(stats.counts, expected), layer
        else:
            state.propagate(layer, module)
        getattr(state, "flush_hidden", lambda: None)()  # hidden states may be written by a thread


def test_half_the_experts_load_strictly_and_generate(tiny_models, halved, more_family):
    spec = ARCHITECTURES[more_family]
    source_dir, out = tiny_models(more_family), halved(more_family)
    # vision-language checkpoints load strictly as the whole model (vision tower included)
    loader = AutoModelForImageTextToText if more_family in VISION else AutoModelForCausalLM
    model, info = loader.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    text_config = model.config.text_config if more_family in VISION else model.config
    before = spec.num_experts(Model.open(source_dir).config)
    k = json.loads((out / "streammerge.json").read_text())["experts_after"]
    assert k == before // 2 and spec.num_experts(text_config) == k
    assert spec.top_k(text_config) <= k
    source, merged = CheckpointReader(source_dir), CheckpointReader(out)
    assert sorted(merged.names()) == sorted(
        n for n in source.names()
        if not any(f".experts.{e}." in n for e in range(k, before)))  # same names, experts renumbered 0..K-1
    for layer in spec.moe_layers(text_config):
        assert merged.info[spec.router_name(layer)][1][0] == k
        for name, dim in spec.router_vector_names(layer):
            assert merged.info[name][1][dim] == k
        for name in spec.fused_names(layer):
            assert merged.info[name][1] == (k, *source.info[name][1][1:])
    routed = {n for layer in spec.moe_layers(text_config) for n in spec.routed_names(layer, before)}
    kept = [n for n in source.names() if n not in routed]
    a, b = source.read(kept), merged.read(kept)
    assert all(torch.equal(a[n], b[n]) for n in kept)
    prompt = AutoTokenizer.from_pretrained(out)("The module", return_tensors="pt")
    if more_family == "llama4" and LLAMA4_VL_FORWARD_BROKEN:
        # transformers 5.24's Llama4ForConditionalGeneration.forward builds its output from
        # `outputs.image_outputs` of the text model's output, which has no such field, so any forward of the
        # vision-language model fails, before or after compression. Its text model holds every compressed
        # tensor, so generation is checked through it; the raises below fails once upstream is fixed.
        with pytest.raises(AttributeError, match="image_outputs"):
            model.generate(**prompt, max_new_tokens=4, do_sample=False)
        model = model.language_model
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > 2


def test_group_limited_routing_keeps_experts_in_their_groups(tiny_models, halved):
    out = halved("deepseek_v3")
    config = AutoModelForCausalLM.from_pretrained(out).config
    size = 32 // config.n_group
    for layer in json.loads((out / "streammerge.json").read_text())["layers"]:
        if "groups" in layer:
            assert len(layer["groups"]) == 16
            for k, members in enumerate(layer["groups"]):  # output group k//2 holds experts of input group k//2
                assert {e // size for e in members} == {k // (16 // config.n_group)}


def test_group_limited_routing_refuses_invalid_counts(tiny_models, tmp_path):
    with pytest.raises(InputError, match="multiple of 8 with at least 2 per group"):
        Run(tiny_models("deepseek_v3"), tmp_path / "out", RunOptions(**{**OPTIONS, "ratio": None, "experts": 8}))


def test_quantized_checkpoints_are_refused_with_the_fix(tiny_models, tmp_path):
    import shutil
    directory = tmp_path / "mxfp4"
    shutil.copytree(tiny_models("gpt_oss"), directory)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="dequantize it to bf16 first"):
        Model.open(directory)


def test_fp8_dequantization_row_by_row_equals_the_whole_tensor_formula():
    from streammerge.arch import dequantize_fp8

    weight, scale = fp8_blocks(torch.randn(300, 200))  # ragged blocks in both dimensions
    whole = scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    assert torch.equal(dequantize_fp8(weight, scale, (128, 128), torch.bfloat16),
                       (weight.float() * whole).to(torch.bfloat16))


def test_block_fp8_checkpoints_are_dequantized_on_read(tiny_models, tmp_path):
    """DeepSeek-V3 as released (FP8 128x128 blocks): read dequantized, written as the unquantized dtype."""
    import shutil
    from safetensors.torch import save_file
    from streammerge.arch import dequantize_fp8
    from streammerge.evaluate import perplexity, token_windows
    from test_evaluate import HELDOUT, SIZES, reference_perplexity
    source = tiny_models("deepseek_v3")
    fp8, plain = tmp_path / "fp8", tmp_path / "dequantized"
    for directory in (fp8, plain):
        directory.mkdir()
        for extra in source.iterdir():
            if not extra.name.endswith(".safetensors") and not extra.name.endswith(".index.json"):
                shutil.copy(extra, directory / extra.name)
    tensors = CheckpointReader(source).read(CheckpointReader(source).names())
    quantized, dequantized = {}, {}
    for name, tensor in tensors.items():
        if name.startswith("model.layers.") and tensor.dim() == 2 and not name.endswith("mlp.gate.weight"):
            weight, scale = fp8_blocks(tensor)
            quantized[name], quantized[name + "_scale_inv"] = weight, scale
            dequantized[name] = dequantize_fp8(weight, scale, (128, 128), tensor.dtype)
        else:
            quantized[name] = dequantized[name] = tensor.contiguous()
    save_file(quantized, str(fp8 / "model.safetensors"))
    save_file(dequantized, str(plain / "model.safetensors"))
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}
    (fp8 / "config.json").write_text(json.dumps(config))
    got = perplexity(fp8, HELDOUT, **SIZES, device="cpu", dtype="float32")["perplexity"]
    ids = token_windows(Model.open(plain).tokenizer(), HELDOUT, SIZES["tokens"], SIZES["seqlen"])
    expected = reference_perplexity(plain, ids)
    assert abs(got - expected) / expected <= 1e-4, (got, expected)
    out = tmp_path / "out"
    run(fp8, out, RunOptions(**OPTIONS))
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    written = CheckpointReader(out)
    assert {dtype for dtype, _ in written.info.values()} == {torch.float32}
    assert not any(n.endswith("_scale_inv") for n in written.names())
    assert model.config.n_routed_experts == 16
    from streammerge.plan import plan_model  # the disk preflight counts the output unquantized
    planned = plan_model(fp8, RunOptions(**OPTIONS))
    assert planned == plan_model(plain, RunOptions(**OPTIONS))


def test_unsupported_family_lists_the_supported_ones():
    from streammerge.arch import spec_for
    with pytest.raises(UnsupportedArchitectureError) as error:
        spec_for({"model_type": "dbrx", "ffn_config": {}, "num_experts": 16})
    assert all(model_type in str(error.value) for model_type in ARCHITECTURES)


def test_jetmoe_is_refused_with_the_reason():
    from streammerge.arch import spec_for
    with pytest.raises(UnsupportedArchitectureError, match="share num_local_experts"):
        spec_for({"model_type": "jetmoe", "num_local_experts": 8})


def test_readme_lists_exactly_the_table():
    from pathlib import Path
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start, end = "<!-- families:start -->\n", "<!-- families:end -->"
    assert start in readme and end in readme
    assert readme.split(start, 1)[1].split(end, 1)[0].strip() == families_table().strip()


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_plan_tables_match_the_checkpoint(tiny_models, family):
    """plan's tables, built without weights, name and shape every tensor as the checkpoint does, before and after."""
    from streammerge.plan import compressed_tensors, config_tensors
    model = Model.open(tiny_models(family))
    table = config_tensors(model.spec, model.config, torch.float32)
    # (a VLM's vision tower, copied unchanged, is not in a plan made from the text config alone)
    assert {n: s for n, (_, s) in table.items()} == {n: s for n, (_, s) in model.reader.info.items()
                                                      if not model.spec.is_passthrough(n)}
    k = model.spec.num_experts(model.config) // 2
    after = compressed_tensors(model.spec, model.config, model.reader.info, k)
    for layer in model.spec.moe_layers(model.config):
        assert after[model.spec.router_name(layer)][1][0] == k


def test_streamed_perplexity_matches_transformers(tiny_models, more_family):
    """`streammerge eval` (and run --eval-text): the family's own final norm, embedding and logits scaling."""
    from test_evaluate import HELDOUT, SIZES, reference_perplexity
    from streammerge.evaluate import perplexity, token_windows
    model_dir = tiny_models(more_family)
    got = perplexity(model_dir, HELDOUT, **SIZES, device="cpu", dtype="float32")
    ids = token_windows(Model.open(model_dir).tokenizer(), HELDOUT, SIZES["tokens"], SIZES["seqlen"])
    expected = reference_perplexity(model_dir, ids)
    assert abs(got["perplexity"] - expected) / expected <= 1e-4, (got, expected)


def _add_tensors(model_dir, tensors: dict, shard="model-mtp.safetensors"):
    from safetensors.torch import save_file
    save_file(tensors, str(model_dir / shard))
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    index["weight_map"].update({name: shard for name in tensors})
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("family, extra, key", [
    ("deepseek_v3", "model.layers.3.", "num_nextn_predict_layers"),  # DeepSeek-V3/GLM: MTP as layer L
    ("qwen3_next", "mtp.", "mtp_num_hidden_layers"),
])
def test_multi_token_prediction_tensors_are_left_out(tiny_models, tmp_path, family, extra, key):
    """Real checkpoints ship MTP weights transformers ignores; the output leaves them out and says so."""
    import shutil
    model_dir = shutil.copytree(tiny_models(family), tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    config[key] = 1
    (model_dir / "config.json").write_text(json.dumps(config))
    source = CheckpointReader(model_dir)
    last = [n for n in source.names() if n.startswith("model.layers.2.")]
    _add_tensors(model_dir, {extra + n[len("model.layers.2."):]: t.clone() for n, t in source.read(last).items()})
    out = tmp_path / "out"
    run(model_dir, out, RunOptions(**OPTIONS))
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert not any(n.startswith(extra) for n in CheckpointReader(out).names())
    assert json.loads((out / "config.json").read_text())[key] == 0


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_inspect_and_plan_work_for_every_family(tiny_models, tmp_path, family):
    import shutil
    from click.testing import CliRunner
    from streammerge.cli import main
    model_dir = tiny_models(family)
    result = CliRunner().invoke(main, ["inspect", str(model_dir)])
    assert result.exit_code == 0 and ARCHITECTURES[family].family in result.output, result.output
    bare = tmp_path / "bare"  # config.json alone: plan from the shapes transformers' classes give
    bare.mkdir()
    shutil.copy(model_dir / "config.json", bare / "config.json")
    result = CliRunner().invoke(main, ["plan", str(bare), "--ratio", "0.5"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("family, overrides, method", [
    ("deepseek_v3", {}, "prune-freq"),
    ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=2), "hcsmoe"),
])
def test_group_limited_compression_stays_in_groups(tmp_path, family, overrides, method):
    from tiny_models import make_model
    model_dir = make_model(family, tmp_path / "model", **overrides)
    out = tmp_path / "out"
    run(model_dir, out, RunOptions(**{**OPTIONS, "method": method}))
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    n_group, experts = model.config.n_group, 2 * model.config.n_routed_experts
    for layer in json.loads((out / "streammerge.json").read_text())["layers"]:
        if "groups" in layer:
            per_group = len(layer["groups"]) // n_group
            for k, members in enumerate(layer["groups"]):
                assert {e // (experts // n_group) for e in members} == {k // per_group}
    assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


def test_fitted_routers_are_refused_for_non_softmax_routing(tiny_models, tmp_path):
    with pytest.raises(InputError, match="--router kl fits a softmax router"):
        Run(tiny_models("deepseek_v3"), tmp_path / "out", RunOptions(**{**OPTIONS, "router": "kl"}))
