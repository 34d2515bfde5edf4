import hashlib
from pathlib import Path

import pytest

from tiny_models import FAMILIES, make_model


def tree_hash(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(directory)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


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


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param
