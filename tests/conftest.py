"""Shared fixtures: a tiny randomly initialised Llama (plumbing), the real default model (claims about
detection), small dataset files, and an isolated embedding cache per test."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_slow = pytest.mark.skip(reason="slow: pass --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own embedding cache unless it passes one explicitly."""
    monkeypatch.setenv("SAFT_GX_CACHE", str(tmp_path / "cache"))
    from saft_gx import pipeline

    pipeline._SESSIONS.clear()
    yield
    pipeline._SESSIONS.clear()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 4-layer, 32-wide Llama with SmolLM2's tokenizer and chat template, random weights (seed 0)."""
    from saft_gx.testing import tiny_model_folder

    return tiny_model_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from saft_gx.embedding.models import load_model

    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def default_model_cache(tmp_path_factory) -> Path:
    """The cache folder ``default_lm`` was loaded under: it holds the float32 copy of the GGUF file made then."""
    return tmp_path_factory.mktemp("default-model-cache")


@pytest.fixture(scope="session")
def default_lm(default_model_cache):
    """The real embedded SmolLM2-135M-Instruct, loaded from its GGUF file (~15–50 s, once per test session)."""
    import os

    from saft_gx.embedding.models import load_model

    before = os.environ.get("SAFT_GX_CACHE")
    os.environ["SAFT_GX_CACHE"] = str(default_model_cache)
    try:
        return load_model(None, device="cpu")
    finally:
        os.environ["SAFT_GX_CACHE"] = before if before is not None else ""
        if before is None:
            del os.environ["SAFT_GX_CACHE"]


TOY_ROWS = [
    ("How do I bake sourdough bread at home?", "Feed your starter, mix flour, water and salt, fold a few times, proof overnight and bake hot."),
    ("What is the capital of Australia?", "Canberra is the capital of Australia."),
    ("Write a haiku about autumn.", "Crisp leaves drift and fall / the maple lets its colours go / cold wind hums softly"),
    ("Explain what a hash map is.", "A hash map stores key-value pairs and finds a key's slot by hashing it, giving fast lookups."),
    ("How many legs does a spider have?", "Spiders have eight legs."),
    ("Suggest a name for a grey cat.", "Ash, Pebble, Smokey or Earl Grey would all suit a grey cat."),
]


@pytest.fixture
def toy_parquet(tmp_path) -> Path:
    """Twelve prompt/response rows with an extra column, as a parquet file."""
    rows = TOY_ROWS * 2
    df = pd.DataFrame(rows, columns=["prompt", "response"])
    df["source"] = [f"s{i}" for i in range(len(df))]
    df["response"] = [r + ("" if i < 6 else " Hope that helps!") for i, r in enumerate(df["response"])]
    path = tmp_path / "toy.parquet"
    df.to_parquet(path)
    return path
