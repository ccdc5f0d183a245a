"""conf/data/*.yaml -> datasets, and the data_tools command lines."""

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from s2megatron.data.config import build_data_from_config, resolve_data_config
from s2megatron.data.testing import make_documents, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ("train_tokenizer", "preprocess_data", "make_passkey_data", "build_builtin_data")


def _load(name):
    return OmegaConf.load(os.path.join(REPO, "conf", "data", f"{name}.yaml"))


def test_every_config_field_is_documented():
    for name in ("builtin", "indexed"):
        text = open(os.path.join(REPO, "conf", "data", f"{name}.yaml")).read()
        for key in _load(name):
            (line,) = [ln for ln in text.splitlines() if ln.startswith(f"{key}:")]
            assert "#" in line, f"{name}.yaml: {key} has no comment"


def test_tools_run_end_to_end(tmp_path):
    """The CLIs, run in-process through main(argv): tokenizer -> dataset -> passkey grid."""
    sys.path.insert(0, REPO)
    try:
        from data_tools import make_passkey_data, preprocess_data, train_tokenizer
    finally:
        sys.path.remove(REPO)
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), make_documents(120, seed=9))
    train_tokenizer.main(["--input", corpus, "--model-prefix", str(tmp_path / "tok"),
                          "--vocab-size", "400", "--num-threads", "1"])
    preprocess_data.main(["--input", corpus, "--tokenizer-model", str(tmp_path / "tok.model"),
                          "--output-prefix", str(tmp_path / "ds"), "--workers", "1", "--quiet"])
    make_passkey_data.main(["--tokenizer-model", str(tmp_path / "tok.model"),
                            "--output", str(tmp_path / "pk.jsonl"), "--context-lengths", "300",
                            "--depths", "0", "1", "--samples-per-cell", "2"])
    assert len((tmp_path / "pk.jsonl").read_text().splitlines()) == 4

    cfg = _load("indexed")
    cfg.paths = [1.0, str(tmp_path / "ds")]
    cfg.tokenizer_model = str(tmp_path / "tok.model")
    cfg.split = "90,10,0"
    sources = resolve_data_config(cfg)
    assert sources.data_paths == ["1.0", str(tmp_path / "ds")] and sources.num_workers == 0
    tok, train, valid = build_data_from_config(cfg, seq_len=32, seed=1, num_train_samples=50,
                                               num_valid_samples=5)
    assert tok.vocab_size == 400 and len(train) >= 50 and len(valid) >= 5
    assert train[0]["tokens"].shape == (32,)


def test_builtin_config_resolves(tmp_path):
    cfg = _load("builtin")
    cfg.cache_dir = str(tmp_path / "cache")
    cfg.corpus_bytes = 200_000
    cfg.vocab_size = 400
    sources = resolve_data_config(cfg)
    assert sources.data_paths[0].startswith(str(tmp_path / "cache"))
    assert os.path.isfile(sources.tokenizer_model) and sources.split == "98,2,0"


def test_config_errors():
    with pytest.raises(ValueError, match="data.kind"):
        resolve_data_config({"kind": "webdataset"})
    with pytest.raises(ValueError, match="tokenizer_model"):
        resolve_data_config({"kind": "indexed", "paths": ["x"]})
    with pytest.raises(ValueError, match="data.paths"):
        resolve_data_config(_load("indexed"))  # the required ??? fields left unset


def test_tools_help_from_repo_root():
    for tool in TOOLS:
        out = subprocess.run([sys.executable, f"data_tools/{tool}.py", "--help"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "usage:" in out.stdout, out.stderr
