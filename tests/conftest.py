import hashlib
import json
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tiny_models import FAMILIES, make_model


def tree_hash(directory: Path, ignore: set[str] = frozenset()) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and path.name not in ignore:
            digest.update(str(path.relative_to(directory)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def default_sigint() -> None:
    """`preexec_fn` of a child that must receive Ctrl-C. A shell starts background jobs (`nohup pytest &`) with
    SIGINT ignored, children inherit that, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def edit_tensor(model_dir: Path, name: str, edit, shard: str | None = None) -> None:
    """Rewrite one tensor of a checkpoint's shard (the index's, unless given) in place: same dtype and shape, so
    every file keeps its size."""
    shard = shard or json.loads((Path(model_dir) / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(Path(model_dir) / shard)
    tensors[name] = edit(tensors[name].clone())
    save_file(tensors, Path(model_dir) / shard, metadata={"format": "pt"})


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> a tiny model directory built on first use; each is checked unchanged at the end."""
    built: dict[str, tuple[Path, str]] = {}

    def get(family: str) -> Path:
        if family not in built:
            path = make_model(family, tmp_path_factory.mktemp(family))
            built[family] = (path, tree_hash(path))
        return built[family][0]

    yield get
    for family, (path, digest) in built.items():
        assert tree_hash(path) == digest, f"a test modified the input model {family}"


@pytest.fixture(scope="session")
def compressed_once(tiny_models, tmp_path_factory):
    """(family, options) -> the `run` output of that family's tiny model, made once per session."""
    from streammerge.pipeline import RunOptions, run

    outputs: dict[tuple, Path] = {}

    def get(family: str, **options) -> Path:
        key = (family, tuple(sorted(options.items())))
        if key not in outputs:
            out = tmp_path_factory.mktemp(f"{family}-out") / "out"
            run(tiny_models(family), out, RunOptions(**options))
            outputs[key] = out
        return outputs[key]

    return get


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def stop_at_layer_1_by_a_full_disk(monkeypatch, model_dir: Path, out: Path, options) -> None:
    """Run until writing layer 1's shard fails as on a full disk: layer 0 is finished and journaled."""
    from streammerge.errors import InsufficientResourcesError
    from streammerge.pipeline import Run, run

    real_stage = Run.stage

    def full_at_layer_1(path, tensors):
        if path.name.startswith("model-00002-"):
            raise InsufficientResourcesError(f"disk full while writing {path}")
        return real_stage(path, tensors)

    with monkeypatch.context() as patched:
        patched.setattr(Run, "stage", staticmethod(full_at_layer_1))
        with pytest.raises(InsufficientResourcesError):
            run(model_dir, out, options)
