"""`streammerge plan`: estimates from config.json and headers alone, checked against real counts and targets."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoConfig

from streammerge.arch import ARCHITECTURES
from streammerge.checkpoint import CheckpointReader
from streammerge.cli import main
from streammerge.model import Model
from streammerge.pipeline import RunOptions, run
from streammerge.plan import config_tensors, estimate, plan_model
from tiny_models import CONFIGS

GB = 10**9
MIXTRAL = CONFIGS / "mistralai__Mixtral-8x7B-v0.1.json"
QWEN3 = CONFIGS / "Qwen__Qwen3-30B-A3B.json"


def bare_config(directory: Path, source: Path, **changes) -> Path:
    """A model directory holding only config.json, as the Hub's, with `changes` applied."""
    directory.mkdir(parents=True, exist_ok=True)
    raw = json.loads(source.read_text())
    raw.update(changes)
    (directory / "config.json").write_text(json.dumps(raw))
    return directory


def plan_json(*args):
    result = CliRunner().invoke(main, ["plan", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_mixtral_8x7b_fits_8gb_of_gpu_on_a_cpu_machine(tmp_path):
    plan = plan_json(bare_config(tmp_path, MIXTRAL), "--ratio", "0.5", "--samples", "32", "--seqlen", "2048",
                     "--batch", "4", "--device", "cuda")
    assert (plan["device"], plan["compute_dtype"], plan["weights_dtype"]) == ("cuda", "bfloat16", "bfloat16")
    assert plan["device_peak"] <= 8 * GB, plan["device_memory"]
    assert "CUDA context" in plan["device_memory"]
    # all 8 experts of a layer in bf16 are 2.82 GB (configs/README.md); only one is ever on the device
    assert plan["device_memory"]["one expert"] == 3 * 4096 * 14336 * 2
    assert plan["disk"]["hidden states"] == 3 * 32 * 2048 * 4096 * 2


def test_device_peak_does_not_grow_with_expert_count(tmp_path):
    """Qwen3-30B-A3B's 128 experts, and DeepSeek-V3's 256 on the same layers."""
    # The output fit holds one system per KEPT expert, which does grow with E at a fixed ratio: left out here.
    options = RunOptions(ratio=0.5, samples=32, seqlen=2048, batch=4, device="cuda", fit="none")
    small, large = (plan_model(bare_config(tmp_path / str(e), QWEN3, num_experts=e), options) for e in (128, 256))
    assert large.input_bytes > 1.9 * small.input_bytes
    assert {k: v for k, v in large.device_memory.items() if k != "routing"} == \
        {k: v for k, v in small.device_memory.items() if k != "routing"}
    # Only the router, its logits and every expert's outputs on the sampled tokens of every chunk (the token
    # distances need them all, since each expert runs over all chunks before the next) scale with E: far less
    # than holding the layer's experts would add for the 128 new ones (1.2 GB).
    growth = large.device_peak - small.device_peak
    assert growth == large.device_memory["routing"] - small.device_memory["routing"]
    assert growth < 0.25 * 128 * large.device_memory["one expert"]


@pytest.mark.parametrize("source, total", [
    ("mistralai__Mixtral-8x7B-v0.1", 46_702_792_704),
    ("Qwen__Qwen1.5-MoE-A2.7B", 14_315_784_192),
    ("Qwen__Qwen3-30B-A3B", 30_532_122_624),
    ("allenai__OLMoE-1B-7B-0924", 6_919_161_856),
])
def test_parameter_count_from_config_alone(tmp_path, source, total):
    plan = plan_model(bare_config(tmp_path, CONFIGS / f"{source}.json"), RunOptions(ratio=0.5, device="cpu"))
    assert plan.parameters_before == total
    assert plan.input_bytes == 2 * total  # bf16 assumed, as the configs declare


def test_config_shapes_match_a_saved_checkpoint(tiny_models, family):
    model = Model.open(tiny_models(family))
    assert config_tensors(model.spec, model.config, model.weights_dtype) == model.reader.info


def test_counts_match_the_checkpoint_and_the_run_output(tiny_models, tmp_path):
    model_dir = tiny_models("mixtral")
    options = RunOptions(ratio=0.5, samples=4, seqlen=16, device="cpu")
    plan = plan_model(model_dir, options)
    assert plan.source == "checkpoint headers"
    before = CheckpointReader(model_dir)
    assert (plan.parameters_before, plan.input_bytes) == (before.num_parameters(), before.nbytes(before.names()))
    run(model_dir, tmp_path / "out", options)
    after = CheckpointReader(tmp_path / "out")
    assert (plan.parameters_after, plan.output_bytes) == (after.num_parameters(), after.nbytes(after.names()))
    assert plan.disk["output"] == plan.output_bytes


def test_cpu_plan_counts_the_working_set_in_host_ram(tmp_path):
    directory = bare_config(tmp_path, MIXTRAL)
    cpu = plan_model(directory, RunOptions(ratio=0.5, device="cpu"))
    assert cpu.compute_dtype == "float32" and "CUDA context" not in cpu.device_memory
    assert all(cpu.host_memory[f"device: {name}"] == n for name, n in cpu.device_memory.items())
    assert cpu.host_peak > cpu.device_peak + cpu.host_memory["saving"]


def test_eager_attention_adds_the_score_matrices(tmp_path):
    spec = ARCHITECTURES["mixtral"]
    config = AutoConfig.from_pretrained(bare_config(tmp_path, MIXTRAL))
    tensors = config_tensors(spec, config, torch.bfloat16)
    options = RunOptions(ratio=0.5, samples=8, seqlen=4096, batch=2, device="cuda")
    sdpa = estimate(spec, config, tensors, options, "cuda")
    eager = estimate(spec, config, tensors, options, "cuda", attention="eager")
    scores = 2 * 32 * 4096**2 * (2 + 4)  # batch × heads × seqlen² in bf16 and their float32 softmax
    assert eager.device_memory["working set"] >= scores
    assert sdpa.device_peak < eager.device_peak <= sdpa.device_peak + scores


@pytest.mark.parametrize("args, phrase", [
    (["--ratio", "1.5"], "--ratio 1.5"),
    (["--ratio", "0.5", "--experts", "4"], "exactly one"),
    (["--ratio", "0.5", "--device", "tpu!"], "not a device"),
    (["--ratio", "0.5", "--batch", "0"], "at least 1"),
])
def test_bad_options_are_refused(tmp_path, args, phrase):
    result = CliRunner().invoke(main, ["plan", str(bare_config(tmp_path, MIXTRAL)), *args])
    assert result.exit_code == 2 and result.output.startswith("error: ") and phrase in result.output, result.output


def test_unsupported_and_missing_models_are_refused(tmp_path):
    result = CliRunner().invoke(main, ["plan", str(tmp_path / "nope"), "--ratio", "0.5"])
    assert result.exit_code == 2 and "does not exist" in result.output
    dbrx = tmp_path / "dbrx"  # deepseek_v3 was the example here until it became supported
    dbrx.mkdir()
    (dbrx / "config.json").write_text(json.dumps({"model_type": "dbrx", "ffn_config": {"moe_num_experts": 16},
                                                  "num_experts": 16}))
    result = CliRunner().invoke(main, ["plan", str(dbrx), "--ratio", "0.5"])
    assert result.exit_code == 2 and "unsupported model_type 'dbrx'" in result.output, result.output


def test_weights_make_a_checkpoint_plan(tiny_models, tmp_path):
    """With any weight file present the headers are authoritative: a broken checkpoint is refused, not guessed."""
    model_dir = shutil.copytree(tiny_models("mixtral"), tmp_path / "model")
    for shard in model_dir.glob("*.safetensors"):
        shard.write_bytes(b"garbage")
    result = CliRunner().invoke(main, ["plan", str(model_dir), "--ratio", "0.5"])
    assert result.exit_code == 2 and "corrupt" in result.output, result.output


def test_expert_activations_match_a_traced_run(tiny_models, tmp_path, monkeypatch):
    """The plan's experts working set (4·I per token: gate/up output, activation, their product) against the
    peak of what the CPU allocator holds inside each expert call of a real run, traced by torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    from streammerge.runner import ExpertStream

    model_dir = tiny_models("mixtral")  # I = 96 > H / 3 = 21: the activations are an expert call's peak
    options = RunOptions(ratio=0.5, samples=4, seqlen=64, batch=4, device="cpu", method="hcsmoe", fit="none")
    plan = plan_model(model_dir, options)
    real, peaks = ExpertStream.every_token, []

    def traced(self, x):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = real(self, x)
        live = peak = 0  # allocations and frees, in order
        for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                            key=lambda e: e.start_ns()):
            live += event.nbytes()
            peak = max(peak, live)
        peaks.append((x.shape[0], peak))
        return out

    monkeypatch.setattr(ExpertStream, "every_token", traced)
    run(model_dir, tmp_path / "out", options)
    tokens, peak = max(peaks)  # the statistics' calls, on a whole chunk
    assert tokens == plan.chunk_tokens == 256
    assert plan.device_memory["working set"] == plan.chunk_tokens * plan.expert_bytes_per_token
    assert peak == pytest.approx(plan.device_memory["working set"], rel=0.1)


def test_placement_moves_tokens_to_the_host_then_sub_batches_the_experts(tmp_path):
    from streammerge.plan import MIN_EXPERT_ROWS, placement
    from streammerge.routed import Placement

    plan = plan_model(bare_config(tmp_path, MIXTRAL), RunOptions(ratio=0.5, samples=32, seqlen=2048, batch=4,
                                                                 device="cuda", fit="none"))
    assert placement(plan, plan.device_peak) == Placement()
    on_host = plan.device_peak - plan.device_memory["routed tokens"]
    assert placement(plan, on_host) == Placement(tokens_on_device=False)
    half = placement(plan, on_host - plan.device_memory["working set"] // 2)
    assert not half.tokens_on_device and half.max_rows == plan.chunk_tokens // 2
    assert placement(plan, on_host - plan.device_memory["working set"]
                     + (MIN_EXPERT_ROWS - 1) * plan.expert_bytes_per_token) is None


def test_the_family_s_own_attention_is_planned(tiny_models):
    """gpt-oss runs eager attention (its sinks), whose score matrices sdpa would never hold."""
    model = Model.open(tiny_models("gpt_oss"))
    options = RunOptions(ratio=0.5, samples=4, seqlen=512, batch=4, device="cuda")
    planned = estimate(model.spec, model.config, model.tensor_table, options, "cuda")
    assert planned == estimate(model.spec, model.config, model.tensor_table, options, "cuda", attention="eager")
    assert planned.device_peak > estimate(model.spec, model.config, model.tensor_table, options, "cuda",
                                          attention="sdpa").device_peak


def test_small_sizes_in_mb_and_a_time_estimate_or_why_none(tiny_models):
    printed = CliRunner().invoke(main, ["plan", str(tiny_models("mixtral")), "--ratio", "0.5", "--device", "cpu"])
    assert printed.exit_code == 0, printed.output
    assert "0.00 GB" not in printed.output and " MB" in printed.output
    assert "time          at least " in printed.output and "GFLOP/s, the float32 matmul rate timed here on cpu" in printed.output
    if not torch.cuda.is_available():
        printed = CliRunner().invoke(main, ["plan", str(tiny_models("mixtral")), "--ratio", "0.5", "--device", "cuda"])
        assert "time          no estimate: this machine has no cuda device" in printed.output, printed.output


def test_the_output_fit_is_counted(tmp_path):
    """--fit lsq keeps the kept experts' down-projection inputs on the fitted tokens and solves per candidate."""
    directory = bare_config(tmp_path, MIXTRAL)
    fitted, plain = (plan_model(directory, RunOptions(ratio=0.5, samples=32, seqlen=2048, device="cuda", fit=fit))
                     for fit in ("lsq", "none"))
    assert fitted.device_memory["working set"] > plain.device_memory["working set"]
    assert fitted.device_peak <= 8 * GB
    assert fitted.host_memory["fit"] > 0 and "fit" not in plain.host_memory
    assert fitted.largest_layer.flops > plain.largest_layer.flops


def test_plan_does_not_import_the_pipeline():
    """pipeline -> plan, evaluate -> device: no import circle between the run, its plan and eval."""
    code = "import sys, streammerge.plan, streammerge.evaluate; print('streammerge.pipeline' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
