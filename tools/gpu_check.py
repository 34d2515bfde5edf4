"""Checks of the CUDA path on a real GPU (issue 14), in one run of a few minutes; results as JSON.

    PYTHONPATH=. python3 tools/gpu_check.py [--out DIR] [--smoke]

Without CUDA it exits 3 at once. `--smoke` runs the checks on the CPU at tiny sizes, leaving out those that need
a GPU and those the test suite makes on the CPU (fp8, resume); tests/test_gpu_check.py runs it, so the script
cannot rot. It installs nothing and builds its tiny
models on the spot (tests/tiny_models.py), so it runs from the repository on a machine that reaches nothing
(torch >= 2.11, transformers >= 5.17). Results go to DIR/gpu_check.json (DIR: --out, else $OUT, else the current
directory); the exit code is 1 when a check failed.

Checks:
  layers       every layer streamed on the device equals transformers' model on the device (tiny Mixtral and
               DeepSeek-V3; bfloat16 and float32): the largest difference relative to the hidden states' size
  routers      router and e_score_correction_bias dtypes against transformers' model in bfloat16
  fp8          a block-FP8 DeepSeek-V3, its experts dequantized on the device, against its dequantized copy
  resume       `run` killed with SIGKILL once its first layer is saved, then resumed: byte-identical to a run
               left alone
  real_layer   one Mixtral-8x7B-size layer (synthetic bf16 weights), 32 × 2048 calibration tokens: peak device
               memory against `plan`, the busy fraction of the device during the statistics pass, the upload
               rate of one expert from the mapped checkpoint and the time of its matmuls on one chunk
  oom          what a user sees when the device runs out of memory mid-run (memory capped at 1 GB)
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

if __name__ == "__main__" and "--smoke" not in sys.argv and not torch.cuda.is_available():
    print("no CUDA device visible to torch: nothing to check (use --smoke for the CPU checks)", file=sys.stderr)
    sys.exit(3)  # at once: before transformers is imported

import click  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models
sys.path.insert(0, str(ROOT / "tools"))  # make_synthetic

from streammerge.pipeline import Run, RunOptions, run  # noqa: E402
from streammerge.model import Model  # noqa: E402
from streammerge.plan import plan_model  # noqa: E402
from streammerge.runner import LayerRunner  # noqa: E402

GB = 1e9
MIXTRAL = ROOT / "tests" / "configs" / "mistralai__Mixtral-8x7B-v0.1.json"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # of the hidden states' RMS, worst layer


def layers(device: torch.device, work: Path, families: tuple[str, ...]) -> dict:
    from transformers import AutoModelForCausalLM

    from tiny_models import make_model

    result = {}
    for family in families:
        model_dir = make_model(family, work / family)
        model = Model.open(model_dir)
        tokens = torch.randint(3, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        for dtype in (torch.bfloat16, torch.float32):
            full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
            with torch.no_grad():
                expected = full(tokens.to(device), output_hidden_states=True).hidden_states
            runner = LayerRunner(model.spec, model.config, device, dtype)
            hidden = runner.embed(tokens.to(device), model.reader.read([model.spec.embed_name])[model.spec.embed_name]
                                  .to(device, dtype))
            worst = 0.0
            for layer in range(model.config.num_hidden_layers - 1):  # the last hidden state is normed
                module = runner.build(layer, model.read(model.layer_names(layer)))
                hidden = runner.forward(module, layer, hidden)
                reference = expected[layer + 1].float()
                worst = max(worst, ((hidden.float() - reference).abs().max() / reference.pow(2).mean().sqrt()).item())
            name = f"{family} {str(dtype).removeprefix('torch.')}"
            result[name] = {"max_difference_over_rms": worst, "ok": worst <= TOLERANCE[dtype]}
    return result


def routers(device: torch.device, work: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from tiny_models import make_model

    model_dir = make_model("deepseek_v3", work / "routers")
    model = Model.open(model_dir)
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    runner = LayerRunner(model.spec, model.config, device, torch.bfloat16)
    layer = model.spec.moe_layers(model.config)[0]
    ours = runner.build(layer, model.read(model.layer_names(layer)))
    theirs = full.model.layers[layer]
    ours, theirs = ({**dict(m.named_parameters()), **dict(m.named_buffers())} for m in (ours, theirs))
    names = [n for n in theirs if n.startswith("mlp.gate.")]
    dtypes = {n: {"ours": str(ours[n].dtype), "transformers": str(theirs[n].dtype)} for n in names}
    return {"dtypes": dtypes, "ok": all(d["ours"] == d["transformers"] for d in dtypes.values())}


def fp8(device: torch.device, work: Path) -> dict:
    """A block-FP8 DeepSeek-V3 (dequantized on the device) against its dequantized copy: equal perplexity."""
    import shutil

    from safetensors.torch import save_file

    from streammerge.arch import dequantize_fp8
    from streammerge.checkpoint import CheckpointReader
    from streammerge.evaluate import perplexity
    from tiny_models import TEXT, fp8_blocks, make_model

    source = make_model("deepseek_v3", work / "fp8-source")
    quantized_dir, plain_dir = work / "fp8", work / "fp8-dequantized"
    quantized, plain = {}, {}
    reader = CheckpointReader(source)
    for name, tensor in reader.read(reader.names()).items():
        if name.startswith("model.layers.") and tensor.dim() == 2 and not name.endswith("mlp.gate.weight"):
            weight, scale = fp8_blocks(tensor)
            quantized[name], quantized[name + "_scale_inv"] = weight, scale
            plain[name] = dequantize_fp8(weight, scale, (128, 128), tensor.dtype)
        else:
            quantized[name] = plain[name] = tensor.contiguous()
    for directory, tensors in ((quantized_dir, quantized), (plain_dir, plain)):
        directory.mkdir()
        for extra in source.iterdir():
            if not extra.name.endswith((".safetensors", ".index.json")):
                shutil.copy(extra, directory / extra.name)
        save_file(tensors, str(directory / "model.safetensors"))
    config = json.loads((quantized_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (quantized_dir / "config.json").write_text(json.dumps(config))
    sizes = dict(tokens=512, seqlen=64, batch=4, device=str(device), dtype="float32")
    got, expected = (perplexity(d, TEXT, **sizes)["perplexity"] for d in (quantized_dir, plain_dir))
    return {"fp8": got, "dequantized": expected, "ok": abs(got - expected) <= 1e-4 * expected}


def _hashes(directory: Path) -> dict:
    names = [p.name for p in directory.glob("*.safetensors")] + ["model.safetensors.index.json", "config.json"]
    return {n: hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in sorted(names)}


def resume(device: torch.device, work: Path) -> dict:
    from tiny_models import make_model

    model_dir = make_model("mixtral", work / "resume-model", layers=6)
    args = ["--ratio", "0.5", "--samples", "8", "--seqlen", "64", "--batch", "2", "--device", str(device)]
    command = lambda out: [sys.executable, "-m", "streammerge", "run", str(model_dir), str(out), *args]  # noqa: E731
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(command(work / "clean"), check=True, capture_output=True, env=env)
    out = work / "killed"
    process = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    while process.poll() is None and not any(out.glob("model-00001-*.safetensors")):
        time.sleep(0.01)
    killed = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    subprocess.run(command(out), check=True, capture_output=True, env=env)
    same = _hashes(out) == _hashes(work / "clean")
    return {"killed_mid_run": killed, "byte_identical": same, "ok": same}


def real_layer(device: torch.device, work: Path, smoke: bool) -> dict:
    """One layer at real size (smoke: a shrunken config), compressed once in this process."""
    from make_synthetic import make_synthetic

    config = MIXTRAL
    samples, seqlen, batch = (32, 2048, 4) if not smoke else (4, 64, 2)
    if smoke:
        raw = json.loads(MIXTRAL.read_text())
        raw.update(hidden_size=64, intermediate_size=224, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=512)
        config = work / "small.json"
        config.write_text(json.dumps(raw))
    model_dir = work / "real-layer"
    make_synthetic(config, model_dir, layers=1)
    options = RunOptions(ratio=0.5, samples=samples, seqlen=seqlen, batch=batch, device=str(device))
    plan = plan_model(model_dir, options)
    result = {"plan_device_peak_gb": plan.device_peak / GB, "plan_device_memory_gb":
              {k: v / GB for k, v in plan.device_memory.items()}}

    state = Run(model_dir, work / "real-layer-stats", options)
    state.journal.open(state.signature_fields(), state.output_files(), state.num_layers, restart=False)
    state.embed()
    tensors = state.model.read(state.model.layer_names(0))
    module = state.runner.build(0, tensors)
    stream = state.spec.moe_block(module).experts
    result.update(_upload_and_matmul(stream, state, device))
    if device.type == "cuda":
        result["busy_fraction"] = _busy_fraction(lambda: state.measure(0, module, state.hidden(0), state.hidden(1)))
        result["ok_busy"] = result["busy_fraction"] >= 0.8
    state.flush_hidden()
    del state, module, stream, tensors  # its expert buffers and staging would count in the run's peak
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        started = time.monotonic()
        run(model_dir, work / "real-layer-out", options)
        result["run_seconds"] = time.monotonic() - started
        # the plan counts the CUDA context, which the allocator does not see
        measured = torch.cuda.max_memory_reserved(device)
        planned = plan.device_peak - plan.device_memory["CUDA context"]
        result.update(peak_reserved_gb=measured / GB, plan_without_context_gb=planned / GB,
                      plan_over_measured=planned / measured, ok_peak=abs(planned / measured - 1) <= 0.15)
    return result


def _upload_and_matmul(stream, state: Run, device: torch.device) -> dict:
    """One expert from the mapped checkpoint to the compute buffers, and its matmuls on one chunk."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pieces = state.spec.expert_pieces(stream.experts[1])
    nbytes = sum(t.numel() * t.element_size() for _, _, t in pieces)
    stream._load(0)
    sync()
    started = time.monotonic()
    stream._load(1)
    sync()
    upload = time.monotonic() - started
    x = torch.randn(state.options.batch * state.options.seqlen, state.config.hidden_size, device=device,
                    dtype=state.dtype)
    stream.every_token(x)
    sync()
    started = time.monotonic()
    stream.every_token(x)
    sync()
    return {"upload_gb_per_s": nbytes / upload / GB, "upload_seconds": upload,
            "expert_matmul_seconds_one_chunk": time.monotonic() - started, "expert_bytes": nbytes}


def _busy_fraction(work) -> float:
    """The share of the wall time in which some kernel ran on the device (copies not counted)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter_ns()
        work()
        torch.cuda.synchronize()
        wall = time.perf_counter_ns() - started
    intervals = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in e.name.lower()
                       and "memset" not in e.name.lower())
    busy, end = 0.0, float("-inf")
    for start, stop in intervals:  # microseconds; overlapping kernels count once
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy * 1000 / wall


def oom(device: torch.device, work: Path) -> dict:
    from click.testing import CliRunner

    from streammerge.cli import main

    model_dir = work / "real-layer"
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1e9 / total, device)
    try:
        result = CliRunner().invoke(main, ["run", str(model_dir), str(work / "oom-out"), "--ratio", "0.5",
                                           "--samples", "32", "--seqlen", "2048", "--device", str(device)])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    lines = result.output.strip().splitlines()
    return {"exit_code": result.exit_code, "output": lines,
            "ok": result.exit_code in (2, 3) and bool(lines) and lines[-1].startswith("error: ")}


@click.command()
@click.option("--out", type=click.Path(path_type=Path), help="Where gpu_check.json goes (default: $OUT, else .).")
@click.option("--smoke", is_flag=True, help="The checks that run on the CPU, at tiny sizes.")
def main(out: Path | None, smoke: bool) -> None:
    device = torch.device("cpu" if smoke else "cuda")
    out = Path(out or os.environ.get("OUT") or ".")
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": smoke}
    import transformers

    results["transformers"] = transformers.__version__
    checks = {"layers": lambda d, w: layers(d, w, ("mixtral",) if smoke else ("mixtral", "deepseek_v3")),
              "routers": routers, "real_layer": lambda d, w: real_layer(d, w, smoke)}
    if not smoke:  # on the CPU, tests/test_families.py reads FP8 and tests/test_resume.py resumes killed runs
        checks.update(fp8=fp8, resume=resume)
    if device.type == "cuda":
        checks["oom"] = oom  # after real_layer: it reuses that checkpoint
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for name, check in checks.items():
            started = time.monotonic()
            try:
                results[name] = check(device, Path(tmp))
            except Exception as exc:  # one broken check must not hide the others' figures
                results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc()[-3000:]}
            results[name]["seconds"] = round(time.monotonic() - started, 1)
            click.echo(f"{name}: {json.dumps(results[name], default=str)[:400]}")
            (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    failed = [n for n in checks if not _passed(results[n])]
    click.echo(f"{'failed: ' + ', '.join(failed) if failed else 'all checks passed'}; {out / 'gpu_check.json'}")
    sys.exit(1 if failed else 0)


def _passed(result: dict) -> bool:
    return all(v for k, v in result.items() if k == "ok" or k.startswith("ok_")) and all(
        _passed(v) for v in result.values() if isinstance(v, dict) and "ok" in v)


if __name__ == "__main__":
    main()
