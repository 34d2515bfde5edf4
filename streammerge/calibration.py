"""Calibration: tokenized sample windows, and the on-disk store of hidden states between layers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from .checkpoint import save_shard
from .errors import InputError
from .options import check_text_file


def read_documents(path: Path) -> list[str]:
    """Plain text is one document; JSONL gives one document per line's `text` field."""
    path = Path(path)
    check_text_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"calibration file {path} is not UTF-8 text (byte {exc.start} is not): pass a text or "
                         f"JSONL file to --calib") from exc
    if path.suffix == ".jsonl":
        documents = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                document = json.loads(line)["text"]
                if not isinstance(document, str):
                    raise TypeError(document)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise InputError(f"{path}:{number} is not a JSON object with a string 'text' field: fix that line") from exc
            documents.append(document)
    else:
        documents = [text]
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise InputError(f"calibration file {path} is empty: pass a file with text to --calib")
    return documents


def token_stream(tokenizer, path: Path, limit: int | None = None) -> list[int]:
    """The documents' tokens joined by EOS, stopping once `limit` tokens are read."""
    stream: list[int] = []
    for document in read_documents(path):
        if limit is not None and len(stream) >= limit:
            break
        stream.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    return stream


def sample_windows(tokenizer, path: Path, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`samples` windows of `seqlen` tokens, cut from the documents joined by EOS and picked by `seed`.

    Windows are full length, so there is no padding and every token counts in the statistics.
    """
    stream = token_stream(tokenizer, path)
    windows = len(stream) // seqlen
    if windows < samples:
        raise InputError(
            f"calibration text {path} has {len(stream)} tokens, {windows} windows of {seqlen}; {samples} needed: "
            f"pass more text with --calib or lower --samples/--seqlen"
        )
    ids = torch.tensor(stream[: windows * seqlen], dtype=torch.long).view(windows, seqlen)
    pick = torch.randperm(windows, generator=torch.Generator().manual_seed(seed))[:samples]
    return ids[pick.sort().values]


class HiddenStates:
    """The hidden states that feed one layer, as chunk files in the run's work directory."""

    def __init__(self, work_dir: Path, layer: int, num_chunks: int):
        self.dir = Path(work_dir) / "hidden" / f"layer-{layer:05d}"
        self.num_chunks = num_chunks

    def _path(self, chunk: int) -> Path:
        return self.dir / f"chunk-{chunk:05d}.safetensors"

    def write(self, chunk: int, hidden: torch.Tensor) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        save_shard(self._path(chunk), {"hidden": hidden.detach().to("cpu").contiguous()})

    def read(self, chunk: int, device: torch.device) -> torch.Tensor:
        return load_file(self._path(chunk))["hidden"].to(device)

    def complete(self) -> bool:
        return all(self._path(c).is_file() for c in range(self.num_chunks))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
