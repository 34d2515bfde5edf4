"""Streamed perplexity equals transformers' own full-model loss."""

import math
from pathlib import Path

import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from streammerge.cli import main
from streammerge.evaluate import perplexity, token_windows
from streammerge.model import Model

HELDOUT = Path(__file__).parent.parent / "streammerge" / "data" / "heldout.txt"
SIZES = dict(tokens=300, seqlen=48, batch=2)


@torch.no_grad()
def reference_perplexity(model_dir, ids: torch.Tensor) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll = 0.0
    for window in ids.split(2):
        loss = model(window, labels=window, output_router_logits=False).loss  # mean over B * (L - 1) targets
        nll += loss.double().item() * window.shape[0] * (window.shape[1] - 1)
    return math.exp(nll / (ids.shape[0] * (ids.shape[1] - 1)))


def test_matches_transformers(tiny_models, family):
    model_dir = tiny_models(family)
    got = perplexity(model_dir, HELDOUT, **SIZES, device="cpu", dtype="float32")
    ids = token_windows(Model.open(model_dir).tokenizer(), HELDOUT, SIZES["tokens"], SIZES["seqlen"])
    assert ids.shape == (6, 48) and got["tokens"] == 6 * 47
    expected = reference_perplexity(model_dir, ids)
    assert abs(got["perplexity"] - expected) / expected <= 1e-4, (got, expected)


def test_windows_are_the_start_of_the_joined_text(tiny_models):
    tokenizer = Model.open(tiny_models("mixtral")).tokenizer()
    ids = token_windows(tokenizer, HELDOUT, 100, 30)
    stream = tokenizer(HELDOUT.read_text(), add_special_tokens=False)["input_ids"]
    assert ids.tolist() == [stream[i:i + 30] for i in (0, 30, 60)]


def test_cli(tiny_models, tmp_path):
    model_dir = tiny_models("olmoe")
    args = ["eval", str(model_dir), "--tokens", "100", "--seqlen", "32", "--batch", "2", "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "--text", str(HELDOUT)])
    assert result.exit_code == 0, result.output
    assert "perplexity " in result.output and "over 93 predicted tokens (3 windows of 32)" in result.output

    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "Too short."}\n')
    result = CliRunner().invoke(main, [*args, "--text", str(short)])
    message = result.output.strip()
    assert result.exit_code not in (0, None) and message.startswith("error: ") and "\n" not in message, message
    assert "--text" in message and "--seqlen" in message, message
