"""Run configuration: dataclasses for the model, data and optimization, a JSON/TOML file, and
``--set key=value`` overrides that refuse keys that do not exist."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .._checks import check_choice, check_int

TASKS = ("lm", "vit")


DEFAULT_ATTENTION_LR = "relative"  # the one default of the per-parameter attention lr rule


@dataclass
class DataConfig:
    """Where the data comes from. ``path=None`` and ``hf_dataset=None`` is the built-in corpus.

    Text (``lm``): ``path`` (file or folder), ``hf_dataset``, ``hf_text_column``, ``tokenizer``.
    Images (``vit``): ``source`` (``fashion-mnist`` | ``idx`` | ``npz`` | ``folder`` | ``digits``)
    read from ``path``, ``augment`` (random crop with padding ``pad``; flips where they make sense).
    """

    path: str | None = None
    hf_dataset: str | None = None
    hf_text_column: str = "text"
    tokenizer: str = "char"
    val_fraction: float = 0.1
    source: str = "fashion-mnist"
    augment: bool = True
    pad: int = 2


@dataclass
class TrainConfig:
    """Optimization and bookkeeping of one run.

    AdamW with decoupled weight decay on matrices (not on norms, biases or 1-D tensors), linear
    warmup then cosine decay to ``min_lr_ratio·lr``, gradient clipping by global norm.
    ``attention_lr="relative"`` scales each attention parameter's learning rate by its layer's
    ``lr_scales()`` (init std × sqrt(d_model): 1 for MHA/GQA weights, larger for Tucker's cores
    and head factors, which otherwise learn slowly in relative terms); ``"uniform"`` uses one
    rate. ``attention_lr_scale`` multiplies the learning rate of every attention parameter.
    ``batch_size`` is the global batch (split across DDP processes). ``precision``: ``auto`` is
    bf16 autocast on CUDA and float32 on CPU.
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    attention_lr_scale: float = 1.0
    attention_lr: str = DEFAULT_ATTENTION_LR
    eval_interval: int = 100
    eval_windows: int = 256
    checkpoint_interval: int = 250
    log_interval: int = 10
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_interval", "eval_windows", "checkpoint_interval", "log_interval"):
            check_int(f"train.{name}", getattr(self, name))
        check_int("train.warmup_steps", self.warmup_steps, low=0)
        check_int("train.seed", self.seed, low=0)
        for name in ("lr", "attention_lr_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"train.{name} must be > 0, got {getattr(self, name)}")
        for name in ("min_lr_ratio", "beta1", "beta2"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"train.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("train.weight_decay and train.grad_clip must be >= 0 (grad_clip 0 = no clipping)")
        check_choice("train.precision", self.precision, ("auto", "fp32", "bf16"))
        check_choice("train.attention_lr", self.attention_lr, ("relative", "uniform"))


@dataclass
class RunConfig:
    """Everything that defines a run: ``task``, ``model`` (the task's model config as a dict),
    ``data`` and ``train``."""

    task: str = "lm"
    model: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        check_choice("task", self.task, TASKS)
        if isinstance(self.data, dict):
            self.data = _from_dict(DataConfig, self.data, "data")
        if isinstance(self.train, dict):
            self.train = _from_dict(TrainConfig, self.train, "train")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return _from_dict(cls, d, "")


def _from_dict(cls, d: dict, where: str):
    if not isinstance(d, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {d!r}")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; allowed: "
                         f"{[prefix + n for n in names]}")
    return cls(**copy.deepcopy(d))


def parse_value(text: str):
    """A ``--set`` value: JSON (numbers, true/false/null, lists, objects), a comma-separated
    list of numbers (``8,32,16``), or else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if "," not in text:
            return text
    try:
        return [json.loads(v) for v in text.split(",")]
    except json.JSONDecodeError:
        return text


def apply_overrides(config: dict, assignments: list[str], model_keys: list[str]) -> dict:
    """Apply ``key=value`` assignments (dotted keys) to a config dict; returns a new dict.

    Keys must exist: ``task``, ``data.*``, ``train.*``, ``model.<field>`` (``model_keys``), and
    ``model.attention.<argument>`` (checked against the attention method when the model is built).
    """
    config = copy.deepcopy(config)
    sections = {"data": [f.name for f in fields(DataConfig)], "train": [f.name for f in fields(TrainConfig)],
                "model": model_keys}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        parts = key.split(".")
        value = parse_value(raw)
        if parts == ["task"]:
            config["task"] = value
            continue
        if parts[0] not in sections or len(parts) < 2 or parts[1] not in sections[parts[0]]:
            allowed = ["task"] + [f"{s}.{k}" for s, keys in sections.items() for k in keys]
            raise ValueError(f"unknown --set key {key!r}; allowed: {allowed}")
        if len(parts) == 2:
            config.setdefault(parts[0], {})[parts[1]] = value
        elif parts[:2] == ["model", "attention"] and len(parts) == 3:
            spec = config.setdefault("model", {}).get("attention", "mha")
            spec = {"method": spec} if isinstance(spec, str) else dict(spec)
            spec[parts[2]] = value
            config["model"]["attention"] = spec
        else:
            raise ValueError(f"unknown --set key {key!r}: only model.attention.<argument> goes three levels deep")
    return config


def load_config_file(path: str | Path) -> dict:
    """A run config from a ``.json`` or ``.toml`` file (TOML needs Python >= 3.11)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    if path.suffix == ".toml":
        import tomllib

        return tomllib.loads(path.read_text())
    if path.suffix == ".json":
        return json.loads(path.read_text())
    raise ValueError(f"config file must end in .json or .toml, got {str(path)!r}")
