"""The run journal: a signed manifest and one durable record per finished layer, inside out_dir.

Resume trusts only the contiguous prefix of layer records whose shard is on disk with the recorded
size; everything after it is redone. A record is written after its shard and the next layer's hidden
states are durable, so a kill at any instant loses at most the layer in flight.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from .checkpoint import save_json, staged_path
from .errors import InputError, ResumeMismatchError

WORK_DIR = ".streammerge"
PROVENANCE = "streammerge.json"


def signature(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _differences(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


class Journal:
    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.work_dir = self.out_dir / WORK_DIR
        self.manifest_path = self.work_dir / "manifest.json"
        self.records_dir = self.work_dir / "layers"

    def status(self) -> str:
        """`new`, `in_progress`, `complete` or `foreign` (a non-empty directory streammerge did not make)."""
        if not self.out_dir.exists() or not any(self.out_dir.iterdir()):
            return "new"
        if self.manifest_path.is_file():
            return "in_progress"
        if (self.out_dir / PROVENANCE).is_file() and (self.out_dir / "config.json").is_file():
            return "complete"
        return "foreign"

    def manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text())

    def _recorded(self) -> dict:
        path = self.manifest_path if self.manifest_path.is_file() else self.out_dir / PROVENANCE
        return json.loads(path.read_text())

    def open(self, fields: dict, files: list[str], num_layers: int, restart: bool) -> str:
        """Start or resume a run with these signature fields; returns the journal status it found."""
        status = self.status()
        if status == "foreign":
            raise InputError(
                f"out_dir {self.out_dir} is not empty and is not a streammerge output: choose a new or empty directory"
            )
        if status in ("in_progress", "complete"):
            recorded = self._recorded()
            if restart:
                self.discard(recorded.get("files", []))
                status = "new"
            elif recorded.get("signature") != signature(fields):
                raise ResumeMismatchError(
                    f"out_dir {self.out_dir} holds a run with other settings ({_differences(recorded.get('fields', {}), fields)}): "
                    f"re-run with the same settings to resume, or add --restart to discard it"
                )
        if status == "new":
            self.records_dir.mkdir(parents=True, exist_ok=True)
            save_json(self.manifest_path, {"signature": signature(fields), "fields": fields, "files": files,
                                                "num_layers": num_layers})
        return status

    def discard(self, files: list[str]) -> None:
        """Delete what streammerge created here and nothing else."""
        for name in files:
            (self.out_dir / name).unlink(missing_ok=True)
            staged_path(self.out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def _record_path(self, layer: int) -> Path:
        return self.records_dir / f"layer-{layer:05d}.json"

    def finished(self, num_layers: int, prune: bool = True) -> list[dict]:
        """Records of the contiguous prefix of finished layers whose shards are intact.

        With `prune`, records past that prefix are deleted so they are redone.
        """
        records = []
        for layer in range(num_layers):
            try:
                record = json.loads(self._record_path(layer).read_text())
            except (OSError, ValueError):
                break
            shard = self.out_dir / record["shard"]
            if not shard.is_file() or shard.stat().st_size != record["bytes"]:
                break
            records.append(record)
        for stale in range(len(records), num_layers if prune else 0):
            self._record_path(stale).unlink(missing_ok=True)
        return records

    def commit(self, record: dict) -> None:
        save_json(self._record_path(record["layer"]), record)

    def close(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)
