"""The run journal: a signed manifest and one durable record per finished layer, inside out_dir.

Resume trusts only the contiguous prefix of layer records whose shard is on disk as recorded (size and a
sample of its bytes); everything after it is redone. A record is written after its shard and the next
layer's hidden states are durable, so a kill at any instant loses at most the layer in flight.

Every change of state is one rename, so a kill leaves one state or the next: the work directory is built
aside and renamed into place whole, moved aside before it is deleted, and a discarded run is marked as
being discarded before its first file goes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import INDEX_NAME, fsync_dir, sampled_digest, save_json, staged_path
from .errors import CheckpointError, InputError, ResumeMismatchError

WORK_DIR = ".streammerge"
STAGING = ".streammerge.new"  # the work directory while it is built
TRASH = ".streammerge.old"  # a work directory being deleted
LOCK = ".streammerge.lock"
PROVENANCE = "streammerge.json"
MARKERS = ("config.json", INDEX_NAME, PROVENANCE)  # an output with these looks complete: they go first
IGNORED = {".DS_Store", "lost+found", STAGING, TRASH, LOCK}  # an out_dir holding only these counts as empty


def signature(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def source_digest() -> str:
    """Hash of the package's own source: a resume never mixes layers computed by different code."""
    digest = hashlib.sha256()
    package = Path(__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(f"{path.relative_to(package)}\0".encode() + path.read_bytes())
    return digest.hexdigest()


def _differences(old: dict, new: dict, prefix: str = "") -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(_differences(old[k], new[k], f"{prefix}{k}.")
                     if isinstance(old.get(k), dict) and isinstance(new.get(k), dict)
                     else f"{prefix}{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def refuse_inside_input(model_dir: Path, out_dir: Path) -> None:
    """The input is only ever read: out_dir may be neither model_dir (the same directory by any path) nor
    inside it, whatever the options."""
    try:
        model = Path(model_dir).stat()
    except OSError:
        return  # opening the model says what is wrong with it
    out = Path(out_dir).resolve()
    for path in (out, *out.parents):
        try:
            if os.path.samestat(path.stat(), model):
                where = "is" if path == out else "is inside"
                raise InputError(f"out_dir {out_dir} {where} the model directory {model_dir}, which streammerge only "
                                 f"reads: choose an out_dir outside it")
        except OSError:
            continue


class Journal:
    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.work_dir = self.out_dir / WORK_DIR
        self.manifest_path = self.work_dir / "manifest.json"
        self.records_dir = self.work_dir / "layers"

    @contextmanager
    def locked(self):
        """Hold an exclusive lock on out_dir (creating it), so no two runs write it at once. The lock file
        goes when the run ends, and out_dir too if this made it and nothing else is there."""
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise InputError(f"out_dir {self.out_dir} is a file: pass a new or empty directory")
        made = not self.out_dir.exists()
        path = self.out_dir / LOCK
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd = self._lock(path)
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST):
                raise
            raise InputError(f"cannot write to out_dir {self.out_dir} ({exc.strerror}): choose a writable "
                             f"directory") from exc
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while held: a run waiting on this file then sees it is stale
            os.close(fd)
            if made:
                try:
                    self.out_dir.rmdir()
                except OSError:
                    pass

    def _lock(self, path: Path) -> int:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise InputError(f"another streammerge run (pid {pid}) is writing {self.out_dir}: wait for it to "
                                 f"end, or choose another out_dir") from None
            try:
                if os.path.samestat(os.fstat(fd), path.stat()):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder removed this file as it ended: lock the next one
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return fd

    def status(self) -> str:
        """`new`, `in_progress`, `complete` or `foreign` (a non-empty directory streammerge did not make)."""
        if not self.out_dir.is_dir() or all(p.name in IGNORED for p in self.out_dir.iterdir()):
            return "new"
        if self.manifest_path.is_file():
            return "in_progress"
        if all((self.out_dir / name).is_file() for name in MARKERS):
            return "complete"
        return "foreign"

    def manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text())

    def _recorded(self) -> dict:
        path = self.manifest_path if self.manifest_path.is_file() else self.out_dir / PROVENANCE
        return json.loads(path.read_text())

    def check(self, fields: dict, restart: bool) -> str:
        """The status, once out_dir is known usable: not foreign, and holding this run unless `restart`."""
        status = self.status()
        if status == "foreign":
            raise InputError(
                f"out_dir {self.out_dir} is not empty and is not a streammerge output: choose a new or empty directory"
            )
        if status in ("in_progress", "complete") and not restart:
            recorded = self._recorded()
            if not recorded.get("discarding") and recorded.get("signature") != signature(fields):
                raise ResumeMismatchError(
                    f"out_dir {self.out_dir} holds a run with other settings ({_differences(recorded.get('fields', {}), fields)}): "
                    f"re-run with the same settings to resume, or add --restart to discard it"
                )
        return status

    def footprint(self) -> int:
        """Bytes of the files streammerge made in out_dir: a resume reuses them, a restart deletes them."""
        if self.status() not in ("in_progress", "complete"):
            return 0
        files = [self.out_dir / name for name in self._recorded().get("files", [])]
        files += [staged_path(path) for path in files] + [*self.work_dir.rglob("*")]
        return sum(path.stat().st_size for path in files if path.is_file())

    def open(self, fields: dict, files: list[str], num_layers: int, restart: bool) -> str:
        """Start or resume a run with these signature fields; returns the journal status it found."""
        status = self.check(fields, restart)
        if status in ("in_progress", "complete"):
            recorded = self._recorded()
            if restart or recorded.get("discarding"):
                self.discard(recorded.get("files", []))
                status = "new"
        if status == "new":
            self._create({"signature": signature(fields), "fields": fields, "files": files, "num_layers": num_layers})
        return status

    def _create(self, manifest: dict) -> None:
        """Build the work directory aside and rename it into place: it exists with its manifest, or not at all."""
        staging = self.out_dir / STAGING
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(self.out_dir / TRASH, ignore_errors=True)
        (staging / "layers").mkdir(parents=True)
        save_json(staging / "manifest.json", manifest)
        os.replace(staging, self.work_dir)
        fsync_dir(self.out_dir)

    def discard(self, files: list[str]) -> None:
        """Delete what streammerge created here and nothing else. The run is marked as being discarded first,
        and the files that make an output look complete go before the rest, so a kill midway leaves neither
        a partial output that looks complete nor one that looks foreign: the next run finishes the job."""
        marker = {"discarding": True, "files": files, "num_layers": 0}  # no layer of it is kept
        if self.manifest_path.is_file():
            save_json(self.manifest_path, marker)
        else:
            self._create(marker)
        for name in sorted(files, key=lambda name: MARKERS.index(name) if name in MARKERS else len(MARKERS)):
            (self.out_dir / name).unlink(missing_ok=True)
            staged_path(self.out_dir / name).unlink(missing_ok=True)
        fsync_dir(self.out_dir)
        self.close()

    def _record_path(self, layer: int) -> Path:
        return self.records_dir / f"layer-{layer:05d}.json"

    def finished(self, num_layers: int, prune: bool = True) -> list[dict]:
        """Records of the contiguous prefix of finished layers.

        With `prune`, records past that prefix are deleted so they are redone, and a finished layer whose
        shard is no longer as written is refused: the hidden states to redo it are gone.
        """
        records = []
        for layer in range(num_layers):
            try:
                record = json.loads(self._record_path(layer).read_text())
            except (OSError, ValueError):
                break
            shard = self.out_dir / record["shard"]
            if not shard.is_file() or shard.stat().st_size != record["bytes"] or sampled_digest(shard) != record.get("sample"):
                if prune:
                    raise CheckpointError(f"{shard} of finished layer {layer} changed since it was written: "
                                          f"re-run with --restart to compute it again")
                break
            records.append(record)
        for stale in range(len(records), num_layers if prune else 0):
            self._record_path(stale).unlink(missing_ok=True)
        return records

    def commit(self, record: dict) -> None:
        save_json(self._record_path(record["layer"]), record)

    def close(self) -> None:
        """Remove the work directory: moved aside in one rename, then deleted."""
        trash = self.out_dir / TRASH
        shutil.rmtree(trash, ignore_errors=True)
        if self.work_dir.exists():
            os.replace(self.work_dir, trash)
            fsync_dir(self.out_dir)
        shutil.rmtree(trash, ignore_errors=True)
