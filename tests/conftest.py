"""Shared test fixtures.

huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE... once, when it is first imported, so the
Hub environment is set here, before any test module imports huggingface_hub or transformers.
"""

import atexit
import os
import shutil
import socket
import tempfile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HUB_PORT = _free_port()
_HF_HOME = tempfile.mkdtemp(prefix="zoo-tests-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ.update(
    HF_ENDPOINT=f"http://127.0.0.1:{HUB_PORT}",  # the loopback Hub of the `hub` fixture
    HF_HOME=_HF_HOME,
    HF_HUB_CACHE=os.path.join(_HF_HOME, "hub"),
    HF_HUB_DISABLE_TELEMETRY="1",  # also stops the client's GET /api/agent-harnesses
    HF_HUB_DISABLE_XET="1",  # plain HTTP downloads, single-commit uploads
    HF_HUB_DISABLE_PROGRESS_BARS="1",
    WANDB_MODE="offline",
)
for _name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.pop(_name, None)  # no real token goes to the test server; tests opt into offline mode

import pytest  # noqa: E402
from hub_server import HubServer  # noqa: E402  (tests/ is on sys.path: rootdir conftest)


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """A loopback Hugging Face Hub at HF_ENDPOINT: `.url`, `.root`, `.requests`, `.add_repo(id, folder)`."""
    from huggingface_hub import constants

    if constants.ENDPOINT != os.environ["HF_ENDPOINT"]:
        pytest.fail(f"huggingface_hub was imported before tests/conftest.py set HF_ENDPOINT ({constants.ENDPOINT})")
    with HubServer(tmp_path_factory.mktemp("hub"), port=HUB_PORT) as server:
        yield server


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A fresh, empty Hub cache folder that huggingface_hub uses by default during this test."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(autouse=True, scope="session")
def _zoo_cache(tmp_path_factory):
    """Tokenized corpora of the whole session go to one temp folder, never ~/.cache."""
    os.environ["ZOO_CACHE"] = str(tmp_path_factory.mktemp("zoo-cache"))
