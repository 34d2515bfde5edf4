"""Perplexity on held-out text, streamed one decoder layer at a time like `run`.

Only one layer's weights and one chunk of hidden states are in memory at once; the hidden states of
all windows wait on disk between layers, so a model larger than memory fits a small GPU.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .calibration import HiddenStates, token_stream
from .device import out_of_memory, resolve_device, resolve_dtype
from .errors import CheckpointError, InputError
from .model import Model
from .runner import LayerRunner

log = logging.getLogger(__name__)


def token_windows(tokenizer, path: Path, tokens: int, seqlen: int) -> torch.Tensor:
    """The first `tokens` tokens of the documents joined by EOS, cut into consecutive windows of `seqlen`.

    The last partial window is dropped, so there is no padding.
    """
    if seqlen < 2:
        raise InputError(f"--seqlen {seqlen} is too short: a window needs at least 2 tokens to predict one")
    if tokens < seqlen:
        raise InputError(f"--tokens {tokens} is less than one window of --seqlen {seqlen}: raise --tokens or lower --seqlen")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"text file {path} does not exist: pass an existing text or JSONL file to --text")
    stream = token_stream(tokenizer, path, limit=tokens)
    if len(stream) < seqlen:
        raise InputError(
            f"text {path} has {len(stream)} tokens, less than one window of --seqlen {seqlen}: "
            f"pass more text with --text or lower --seqlen"
        )
    windows = min(tokens, len(stream)) // seqlen
    return torch.tensor(stream[: windows * seqlen], dtype=torch.long).view(windows, seqlen)


def final_norm(model: Model, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The family's own final norm module (RMSNorm, LayerNorm with bias, ...), filled from the checkpoint."""
    return LayerRunner(model.spec, model.config, device, dtype).final_norm(model.reader)


def output_embeddings(model: Model) -> torch.Tensor:
    """lm_head; tied models may leave it out and use the embedding matrix, as transformers does."""
    if model.spec.lm_head in model.reader.weight_map:
        return model.reader.read([model.spec.lm_head])[model.spec.lm_head]
    if getattr(model.config, "tie_word_embeddings", False):
        return model.reader.read([model.spec.embed_name])[model.spec.embed_name]
    raise CheckpointError("the checkpoint has no lm_head.weight and tie_word_embeddings is false: it is incomplete")


def chunk_nll(hidden: torch.Tensor, ids: torch.Tensor, norm: torch.nn.Module, head: torch.Tensor) -> float:
    """Summed next-token NLL inside each window, as transformers' `labels=input_ids` loss before its mean.

    A function of its own so the [B, L, V] logits are freed on return, before the next chunk's.
    """
    logits = F.linear(norm(hidden), head).float()
    targets = ids[:, 1:].to(hidden.device)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="none")
    return nll.double().sum().item()


@torch.no_grad()
def perplexity(model_dir: Path, text_path: Path, tokens: int = 16384, seqlen: int = 512, batch: int = 4,
               device: str = "auto", dtype: str = "auto", work_dir: Path | None = None) -> dict:
    """exp(mean next-token NLL) over consecutive windows of the text's first `tokens` tokens.

    Hidden states wait between layers in a temporary directory (under `work_dir` when given).
    """
    if batch < 1:
        raise InputError(f"--batch {batch} must be at least 1 (windows per chunk)")
    model = Model.open(model_dir)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device, model.weights_dtype)
    ids = token_windows(model.tokenizer(), text_path, tokens, seqlen)
    chunks = ids.split(batch)
    log.info("perplexity of %s over %d windows of %d tokens on %s (%s)", model.name, len(ids), seqlen, device,
             str(dtype).removeprefix("torch."))
    try:
        nll = _streamed_nll(model, chunks, device, dtype, work_dir)
    except torch.OutOfMemoryError as exc:
        raise out_of_memory(exc, "eval", "and re-run") from None
    count = len(ids) * (seqlen - 1)
    try:
        value = math.exp(nll / count)
    except OverflowError:  # a badly broken model can score a mean NLL beyond exp's range
        value = math.inf
    return dict(perplexity=value, tokens=count, nll=nll, windows=len(ids))


def _streamed_nll(model: Model, chunks, device: torch.device, dtype: torch.dtype, work_dir: Path | None) -> float:
    """The summed next-token NLL of the chunks' windows, the model streamed layer by layer."""
    with tempfile.TemporaryDirectory(prefix="streammerge-eval-", dir=work_dir) as tmp:
        runner = LayerRunner(model.spec, model.config, device, dtype)
        norm = runner.final_norm(model.reader)  # refuses a checkpoint without one before any work
        table = model.reader.read([model.spec.embed_name])[model.spec.embed_name]
        store = HiddenStates(tmp, 0, len(chunks))
        for c, chunk in enumerate(chunks):
            store.write(c, runner.embed(chunk, table).to(dtype))  # granite scales its embeddings
        del table
        for layer in tqdm(range(model.config.num_hidden_layers), desc="layers", disable=None):
            module = runner.build(layer, model.read(model.layer_names(layer)))
            source, store = store, HiddenStates(tmp, layer + 1, len(chunks))
            for c in range(len(chunks)):
                store.write(c, runner.forward(module, layer, source.read(c, device)))
            source.remove()
            del module
        head = output_embeddings(model).to(device=device, dtype=dtype) * runner.logits_scale  # granite
        return sum(chunk_nll(store.read(c, device), chunk, norm, head) for c, chunk in enumerate(chunks))
