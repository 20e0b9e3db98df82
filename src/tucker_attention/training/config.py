"""Run configuration: dataclasses for the model, data and optimization, a JSON/TOML file, and
``--set key=value`` overrides parsed by the declared field types.

Every field declares its range or choices (:func:`tucker_attention._fields.typed`) and is checked
when the config is built; :meth:`RunConfig.from_dict` checks everything, the model config
included, before a run touches the disk.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._fields import NO_RULE, check_fields, check_keys, field_types, parse_text, typed
from ..data.images import IMAGE_SOURCES
from ..data.tokenizers import TOKENIZERS
from ..models.blocks import attention_arguments, attention_spec
from .task_models import TASK_MODELS

TASKS = ("lm", "vit")
LR_RULES = ("relative", "uniform")
PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_LR_RULE = "relative"  # the one default of the trainer's per-parameter lr rule
#: {old name: name} of the optimization fields that were renamed; config files and run folders
#: written with the old name still load and resume (:func:`renamed`)
RENAMED_FIELDS = {"attention_lr": "lr_rule"}
_ACCELERATORS = ("cuda", "xpu", "mps", "mtia")  # device types whose torch module says whether it is there


@dataclass
class DataConfig:
    """Where the data comes from. ``path=None`` and ``hf_dataset=None`` is the built-in corpus.

    Text (``lm``): ``path`` (file or folder), ``hf_dataset``, ``hf_text_column``, ``tokenizer``.
    Images (``vit``): ``source`` (``fashion-mnist`` | ``idx`` | ``npz`` | ``folder`` | ``digits``)
    read from ``path``, ``augment`` (random crop with padding ``pad``; flips where they make sense).
    ``val_fraction``: the held-out share, in (0, 1).
    """

    path: str | None = None
    hf_dataset: str | None = None
    hf_text_column: str = "text"
    tokenizer: str = typed("char", choices=TOKENIZERS)
    val_fraction: float = typed(0.1, low=0, high=1, low_open=True, high_open=True)
    source: str = typed("fashion-mnist", choices=IMAGE_SOURCES)
    augment: bool = True
    pad: int = typed(2, low=0)

    def __post_init__(self):
        check_fields(self, "data")


@dataclass
class OptimConfig:
    """The optimization section that training (:class:`TrainConfig`) and distillation
    (:class:`~tucker_attention.settings.distill.DistillConfig`) share: the same names,
    checks and meaning, run by :class:`~tucker_attention.training.loop.Loop`.

    AdamW (``beta1``, ``beta2``) with decoupled weight decay on matrices (not on norms, biases or
    1-D tensors), linear warmup (``warmup_steps``) then cosine decay to ``min_lr_ratio·lr``,
    gradient clipping by global norm (``grad_clip`` 0: none). ``lr_rule``: the per-parameter
    learning rate, ``"relative"`` (each parameter's lr times its scale × sqrt(d_model), so that
    Adam moves every weight by the same fraction of its own scale) or ``"uniform"`` (one rate).
    ``batch_size`` is the global batch of one forward/backward (split across DDP processes);
    ``grad_accum_steps`` k: one optimizer step accumulates the gradients of k such micro-batches
    (each loss scaled by 1/k: the gradient of the mean loss over all k·batch_size examples).
    ``eval_windows`` held-out examples are measured every ``eval_interval`` steps; a checkpoint
    is written every ``checkpoint_interval`` steps, and rotation keeps the ``keep_checkpoints``
    newest. ``seed``: weights and data order. ``device``: ``auto`` or a torch device string
    (checked against this machine by :func:`resolve_device` when a run starts). ``precision``:
    ``auto`` is bf16 autocast on CUDA and float32 on CPU. ``max_bad_steps``: how many steps with
    a non-finite loss or gradient norm are skipped before the run stops. ``progress``: a
    progress bar. Errors name a field ``SECTION.field`` (``train.lr``).
    """

    SECTION = ""  # how errors name the fields: "train" gives train.lr

    batch_size: int = typed(32, low=1)
    grad_accum_steps: int = typed(1, low=1)
    lr: float = typed(1e-3, low=0, low_open=True)
    min_lr_ratio: float = typed(0.1, low=0, high=1)
    warmup_steps: int = typed(100, low=0)
    weight_decay: float = typed(0.1, low=0)
    beta1: float = typed(0.9, low=0, high=1, high_open=True)
    beta2: float = typed(0.95, low=0, high=1, high_open=True)
    grad_clip: float = typed(1.0, low=0)
    lr_rule: str = typed(DEFAULT_LR_RULE, choices=LR_RULES)
    eval_interval: int = typed(100, low=1)
    eval_windows: int = typed(256, low=1)
    checkpoint_interval: int = typed(250, low=1)
    keep_checkpoints: int = typed(2, low=1)
    seed: int = typed(0, low=0, high=2**63 - 1)
    device: str = "auto"
    precision: str = typed("auto", choices=PRECISIONS)
    max_bad_steps: int = typed(0, low=0)
    progress: bool = True

    def __post_init__(self):
        check_fields(self, self.SECTION)
        _parse_device(self.device, self.name("device"))  # the syntax only: a GPU machine's config loads anywhere

    def name(self, field_name: str) -> str:
        """How errors and messages name a field: ``train.lr``, or ``lr`` without a section."""
        return f"{self.SECTION}.{field_name}" if self.SECTION else field_name

    @staticmethod
    def default(name: str, value):
        """The shared field ``name`` with another default (the same type and checks), for a section
        whose runs start elsewhere, e.g. ``lr: float = OptimConfig.default("lr", 2e-4)``."""
        return field(default=value, metadata=OptimConfig.__dataclass_fields__[name].metadata)


def renamed(section: dict, where: str = "train") -> dict:
    """``section`` (a mapping of :class:`OptimConfig` fields) with each old name of
    :data:`RENAMED_FIELDS` replaced by today's; both names with different values is an error."""
    section = dict(section)
    for old, new in RENAMED_FIELDS.items():
        if old in section:
            value = section.pop(old)
            if section.setdefault(new, value) != value:
                raise ValueError(f"{where}.{old} (the old name of {where}.{new}) and {where}.{new} differ "
                                 f"({value!r}, {section[new]!r}); give {where}.{new} alone")
    return section


@dataclass
class TrainConfig(OptimConfig):
    """Optimization and bookkeeping of one run: the shared section (:class:`OptimConfig`: lr,
    schedule, batch, accumulation, clipping, ``lr_rule``, ``eval_interval``, ``eval_windows``,
    ``checkpoint_interval``, ``keep_checkpoints``, ``seed``, ``device``, ``precision``,
    ``max_bad_steps``, ``progress``) and what only training has.

    ``steps``: optimizer steps; a step trains on batch_size × grad_accum_steps examples (LM: ×
    block_size tokens) whatever the number of processes, and equals one step with batch_size × k.
    ``lr_rule="relative"`` scales each attention parameter's learning rate by its layer's
    ``lr_scales()`` (init std × sqrt(d_model): 1 for MHA/GQA weights, larger for Tucker's cores
    and head factors, which otherwise learn slowly in relative terms); ``"uniform"`` uses one
    rate. ``attention_lr_scale`` multiplies the learning rate of every attention parameter.
    ``log_interval``: steps between training-loss records. ``compile``: ``torch.compile`` the
    training forward/backward (checkpoints and evaluation use the plain module; a rank cut
    recompiles).
    Rank-adaptive Tucker (:mod:`~tucker_attention.training.ranks`): ``rank_budget_params`` or
    ``rank_budget_kv`` (a fraction <= 1 of MHA's attention parameters / KV floats per token, or
    a count) with a Tucker spec without ranks; the run starts at ``rank_start`` x the budget and
    reaches it in ``rank_cuts`` truncations by ``rank_until`` x ``steps``.
    """

    SECTION = "train"

    steps: int = typed(1000, low=1)
    attention_lr_scale: float = typed(1.0, low=0, low_open=True)
    log_interval: int = typed(10, low=1)
    compile: bool = False
    rank_budget_params: float | None = typed(None, low=0, low_open=True)
    rank_budget_kv: float | None = typed(None, low=0, low_open=True)
    rank_start: float = typed(4.0, low=1)
    rank_until: float = typed(0.5, low=0, high=1, low_open=True)
    rank_cuts: int = typed(4, low=1)


def _parse_device(name: str, setting: str = "train.device") -> torch.device | None:
    """``torch.device(name)``, None for ``auto``; a ValueError naming ``setting`` if it does not parse."""
    if name == "auto":
        return None
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"{setting} must be 'auto' or a torch device such as 'cpu', 'cuda', 'cuda:1' or "
                         f"'mps', got {name!r}") from None


def offered_devices() -> list[str]:
    """The ``train.device`` values this torch build and machine offer: ``auto``, ``cpu`` and each
    available accelerator, bare and by index (``cuda``, ``cuda:0``, ...)."""
    names = ["auto", "cpu"]
    for kind in _ACCELERATORS:
        module = getattr(torch, kind, None)
        if module is not None and hasattr(module, "is_available") and module.is_available():
            count = module.device_count() if hasattr(module, "device_count") else 1
            names += [kind] + [f"{kind}:{i}" for i in range(count)]
    return names


def resolve_device(name: str, local_rank: int = 0, setting: str = "train.device") -> torch.device:
    """The device of ``train.device`` on this machine. ``auto``: ``cuda:local_rank`` when CUDA is
    available, else cpu; an accelerator without index (``cuda``) is the one of ``local_rank``
    (each DDP process its own). A name that does not parse, or a device this build or machine
    does not offer (``cuda`` on a CPU build, ``cuda:7`` with one GPU), raises a ValueError naming ``setting``."""
    device = _parse_device(name, setting)
    if device is None:
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        return device
    index = local_rank if device.index is None else device.index
    offered = offered_devices()
    if f"{device.type}:{index}" not in offered:
        implied = f" (as {device.type}:{index} for local rank {local_rank})" if device.index is None else ""
        raise ValueError(f"{setting}={name!r}{implied} is not available with this torch build and machine; "
                         f"it offers {offered}")
    return torch.device(device.type, index)


@dataclass
class RunConfig:
    """Everything that defines a run: ``task``, ``model`` (the task's model config as a dict; the
    task fills the keys its data decides, e.g. ``vocab_size``), ``data`` and ``train``."""

    task: str = typed("lm", choices=TASKS)
    model: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if not isinstance(self.data, DataConfig):
            self.data = _from_dict(DataConfig, self.data, "data")
        if not isinstance(self.train, TrainConfig):
            self.train = _from_dict(TrainConfig, self.train, "train")
        check_fields(self)
        TASK_MODELS[self.task].check_model(self.model, self.train)

    def to_dict(self) -> dict:
        """The config as JSON data (tuples become lists), as ``config.json`` and checkpoints store it."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """The config of a dict such as a ``config.json``; every key and value is checked here."""
        return _from_dict(cls, d, "")


def _from_dict(cls, d: dict, where: str):
    if issubclass(cls, OptimConfig) and isinstance(d, dict):
        d = renamed(d, where)
    check_keys(cls, d, where)
    return cls(**copy.deepcopy(d))


def _assignment_target(key: str, sections: dict[str, type]):
    """(annotation, rule) of the ``--set`` key ``key``; None for ``model.attention.<name>``."""
    parts = key.split(".")
    if parts == ["task"]:
        return field_types(RunConfig)["task"]
    if len(parts) >= 2 and parts[0] in sections and parts[1] in field_types(sections[parts[0]]):
        if len(parts) == 2:
            return field_types(sections[parts[0]])[parts[1]]
        if parts[:2] == ["model", "attention"] and len(parts) == 3:
            return None
        raise ValueError(f"unknown --set key {key!r}: only model.attention.<argument> goes three levels deep")
    allowed = ["task"] + [f"{s}.{k}" for s, cls in sections.items() for k in field_types(cls)]
    raise ValueError(f"unknown --set key {key!r}; allowed: {allowed}")


def _section(config: dict, name: str) -> dict:
    section = config.setdefault(name, {})
    if not isinstance(section, dict):
        raise TypeError(f"{name} must be a mapping, got {section!r}")
    return section


def _attention(config: dict) -> dict:
    """The attention spec of ``config`` as a (new) dict: ``{"method": ...}`` for a bare name, default mha."""
    spec = _section(config, "model").get("attention", "mha")
    if isinstance(spec, str):
        return {"method": spec}
    if isinstance(spec, dict):
        return dict(spec)
    return attention_spec(spec, "model.attention")  # raises: neither a name nor a dict


def apply_overrides(config: dict, assignments: list[str], model_config_cls: type) -> dict:
    """Apply ``key=value`` assignments (dotted keys) to a config dict; returns a new dict.

    Keys must exist: ``task``, ``data.<field>``, ``train.<field>``, ``model.<field>`` (of
    ``model_config_cls``, e.g. :class:`~tucker_attention.models.GPTConfig`) and
    ``model.attention.<argument>`` of the attention method (set in the same list, before or
    after, or in ``config``; default ``mha``). Each value is parsed by its field's declared type,
    an attention argument by its annotation in the method's constructor (:func:`parse_text`).
    """
    config = copy.deepcopy(config)
    if isinstance(config.get("train"), dict):
        config["train"] = renamed(config["train"])  # an old file's names, so that --set of today's overrides them
    sections = {"data": DataConfig, "train": TrainConfig, "model": model_config_cls}
    arguments = []  # model.attention.<argument>: applied last, once the method is known
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        section, dot, name = key.partition(".")
        if section == "train" and dot and name in RENAMED_FIELDS:
            key = f"train.{RENAMED_FIELDS[name]}"
        target = _assignment_target(key, sections)
        parts = key.split(".")
        if target is None and parts[2] == "method":
            config["model"]["attention"] = {**_attention(config), "method": raw}
        elif target is None:
            arguments.append((key, parts[2], raw))
        elif parts == ["task"]:
            config["task"] = parse_text(key, raw, *target)
        else:
            _section(config, parts[0])[parts[1]] = parse_text(key, raw, *target)
    if arguments:
        spec = _attention(config)
        annotations = attention_arguments(spec.get("method"), [name for _, name, _ in arguments])
        for key, name, raw in arguments:
            spec[name] = parse_text(key, raw, annotations[name], NO_RULE)
        config["model"]["attention"] = spec
    return config


def _json_kind(value) -> str:
    return {dict: "a JSON object", list: "a JSON list", str: "a JSON string", bool: "a JSON boolean",
            type(None): "JSON null"}.get(type(value), "a JSON number")


def load_config_file(path: str | Path) -> dict:
    """A run config (a mapping) from a ``.json`` or ``.toml`` file (TOML needs Python >= 3.11);
    every error names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    if path.suffix not in (".json", ".toml"):
        raise ValueError(f"config file must end in .json or .toml, got {str(path)!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {str(path)!r} is not UTF-8 text ({err})") from None
    if path.suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"config file {str(path)!r} is not valid JSON: {err.msg} at line {err.lineno}, "
                         f"column {err.colno}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping ({{task, model, data, train}}) at the top "
                         f"level, got {_json_kind(data)}")
    return data
