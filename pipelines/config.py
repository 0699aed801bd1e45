"""Training configuration: frozen dataclasses, filled from YAML, overridden by CLI flags.

Config flows one way: defaults below -> YAML file (``--config``) -> command-line flags.
The resolved config is written beside every checkpoint and result (``RUN_DIR/config.yaml``
and inside each checkpoint). A key the dataclasses do not know, or a value of the wrong
type, raises :class:`ConfigError` naming the file and the key, from a file or from
``--set KEY=VALUE`` (an unknown key lists its section's keys; an empty value is refused
unless the key takes null). A config file must be UTF-8.

Layout of a YAML file (every section optional)::

    variant: cm-arr          # a Table 3 row: cm-arr | baseline | no-udcl | no-spcl | no-attention | point,
                             # or baseline-missing (the baseline trained on random missing conditions)
    seed: 0
    device: auto             # auto | cpu | cuda | cuda:N
    model: {}                # CMARRConfig field overrides (cmarr.model.CMARRConfig), e.g. {beta: 0.5}
    optim: {lr: 1.0e-5, batch_size: 16, epochs: 100, ...}
    data: {load: memory, pipeline: auto, validation: stratified, val_fraction: 0.1, ...}
    protocol: {folds: [], train_conditions: auto, select_metric: uar, ...}
    log: {tensorboard: false}

Choices the paper leaves open are fields here; each field's default and meaning is in the
docstring of its section.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml


class ConfigError(Exception):
    """A configuration that cannot be used. ``str(e)`` names the file (or flag) and the key."""


#: The rows of Table 3, then "baseline-missing" (the baseline trained under random missing
#: conditions, as CM-ARR is; not in the paper). Same order as ``cmarr.model.VARIANTS``.
VARIANT_NAMES = ("cm-arr", "baseline", "no-udcl", "no-spcl", "no-attention", "point", "baseline-missing")


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation (paper Sec. 4.2 gives lr, batch size and epochs; the rest is ours).

    lr [1e-5], batch_size [16], epochs [100]: paper, Sec. 4.2. Under torchrun (DDP)
      ``batch_size`` is per process, as in PyTorch's DDP: a step averages the gradients of
      ``batch_size`` x processes utterances at the same lr, and the contrastive losses see
      ``batch_size`` utterances per process. For the paper's setting use one process, or set
      ``batch_size`` to 16 / processes. Each fold's checkpoints and ``metrics.json``
      record the processes (``processes``).
    optimizer ["adam"]: the paper does not name it; Adam is what MMIN and DiCMoR use.
      "adamw" decouples ``weight_decay``.
    weight_decay [0.0], betas [(0.9, 0.999)]: Adam defaults.
    grad_clip [0.0]: max global gradient norm; 0 = no clipping.
    eval_batch_size [512]: evaluation batches (no gradients, so larger is faster).
    amp ["auto"]: mixed precision, training's counterpart of extraction's ``--dtype``. "auto"
      = bf16 autocast on CUDA (as ``--dtype bfloat16``), off elsewhere; "bf16" forces it
      (also on CPU); "off" = fp32 everywhere (as ``--dtype float32``). No float16: bf16
      needs no loss scaling. Weights, optimizer state and checkpoints stay float32.
    compile ["off"]: ``torch.compile`` the model ("on", or "auto" = on when CUDA). The
      compiled training step skips the model's value checks (a host sync, which would split the
      graph); the store's batches satisfy them by construction.
    compile_mode ["default"]: the ``torch.compile`` mode. "reduce-overhead" also captures the
      compiled step in CUDA graphs, which removes the per-operator launch cost that bounds a
      step at batch 16 (fixed shapes: use it with ``data.pipeline = "resident"``);
      "max-autotune" also tunes kernels (slow to compile).
    compile_backend ["inductor"]: the ``torch.compile`` backend ("aot_eager" traces and
      differentiates the same graph without generating kernels: quick, for checking a setup).
    """

    lr: float = 1e-5
    batch_size: int = 16
    epochs: int = 100
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.0
    eval_batch_size: int = 512
    amp: Literal["auto", "off", "bf16"] = "auto"
    compile: Literal["auto", "off", "on"] = "off"
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"


@dataclass(frozen=True)
class DataConfig:
    """Reading the store, batching, and the validation split.

    load ["memory"]: "memory" reads every matrix into RAM once (IEMOCAP fits, about 3.3 GB
      fp16 speech) and checks each modality's frames against the sha256 recorded when the
      store was written (a damaged or altered file is refused); "lazy" opens the HDF5 file
      per DataLoader worker and reads per batch, after one pass that checks the checksums
      in 64 MiB pieces (bounded memory).
    num_workers [0]: DataLoader workers of the eager pipeline (the lazy path benefits).
    pipeline ["auto"]: "eager" pads raw frame sequences per batch (DataLoader) and lets the
      model pool them; "resident" pools every utterance once to ``seq_len`` steps with
      ``cmarr.model.pool_to_steps`` (parameter-free, the model's first operation, so the
      result is the same) and keeps the fold's tensors on the device, batches indexed there.
      "auto" = resident on CUDA, eager elsewhere.
    validation ["stratified"]: how the validation part is drawn from the training sessions
      (the test fold is never used for selection), see :mod:`cmarr.pipelines.validation`:
      "stratified" = a label-stratified ``val_fraction`` of the training utterances, seeded;
      "next-session" = all utterances of the next session after the test one (cyclic);
      "speaker" = the MMIN rule: the test session is split by speaker, one speaker is
      validation and the other test; which one alternates with the fold, so both genders
      are tested over the folds (each fold tests about half of its session).
    val_fraction [0.1]: share of training utterances held out by "stratified".
    fill_absent ["nan"]: value placed in the input rows of a modality that is absent or
      unavailable. NaN, so that a model that reads a missing input produces NaN (a leak
      shows) instead of silently using zeros.
    """

    load: Literal["memory", "lazy"] = "memory"
    num_workers: int = 0
    pipeline: Literal["auto", "eager", "resident"] = "auto"
    validation: Literal["stratified", "next-session", "speaker"] = "stratified"
    val_fraction: float = 0.1
    fill_absent: Literal["nan", "zero"] = "nan"


@dataclass(frozen=True)
class ProtocolConfig:
    """Folds, missing-condition sampling for training, and epoch selection.

    folds [()]: folds to run (1-based, the store's ``fold`` column); empty = every fold.
    train_conditions ["auto"]: how :func:`cmarr.pipelines.data.sample_conditions` picks a
      training sample's available modalities. "missing" (MMIN): one of the six missing
      conditions uniformly, among those whose modalities the sample has; "missing+full":
      the seven conditions; "full": all present modalities (the baseline, Sec. 4.4).
      "auto" = "missing" unless the model config says ``train_missing=False`` (baseline).
    select_metric ["uar"]: validation metric that picks the best epoch ("uar" or "war").
    select_conditions ["all"]: conditions it is averaged over: "all" seven, the six
      "missing" ones, or "full" only.
    """

    folds: tuple[int, ...] = ()
    train_conditions: Literal["auto", "missing", "missing+full", "full"] = "auto"
    select_metric: Literal["uar", "war"] = "uar"
    select_conditions: Literal["all", "missing", "full"] = "all"


@dataclass(frozen=True)
class LogConfig:
    """What a run records besides ``fold<k>/log.csv``, which it always writes.

    tensorboard [false]: also write TensorBoard event files, one TensorBoard run per fold in
      ``RUN_DIR/tensorboard/fold<k>/`` (``tensorboard --logdir RUN_DIR/tensorboard``). Per
      epoch: the loss terms of log.csv (``train/loss_<term>``, ``train/wloss_<term>``, the
      same values), validation WAR and UAR under each of the seven conditions and their
      average over the six missing ones (``val_war/<condition>``, ``val_uar/<condition>``,
      condition codes as in metrics.json: t, s, v, vt, sv, st, svt, avg), the selection
      score (``val/select``), the learning rate (``optim/lr``) and the epoch's wall seconds
      (``time/epoch_seconds``, log.csv's ``seconds``). Off by default: log.csv already holds
      the per-epoch numbers (all but the per-condition ones) and needs no other package. A
      resumed fold goes on with its TensorBoard run: the writer purges what was logged from
      the resumed epoch on (``purge_step``), so an epoch logged before an interruption and
      trained again appears once. Not part of what makes two configs one run
      (:func:`cmarr.pipelines.run_dir.run_identity`): it can be switched on when a run is
      resumed, and then covers the epochs trained from there on.
    """

    tensorboard: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides the feature store.

    variant ["cm-arr"]: the Table 3 row, or "baseline-missing" (``CMARRConfig.for_variant``).
    seed [0]: seeds weights, the validation split, batch order and condition sampling.
    device ["auto"]: "auto" = CUDA when available, else CPU.
    model [{}]: overrides of ``cmarr.model.CMARRConfig`` fields, applied after the variant.
    log: what is recorded besides log.csv (:class:`LogConfig`).
    """

    variant: Literal["cm-arr", "baseline", "no-udcl", "no-spcl", "no-attention", "point",
                     "baseline-missing"] = "cm-arr"
    seed: int = 0
    device: str = "auto"
    model: Mapping[str, Any] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"] = dict(self.model)
        out["optim"]["betas"] = list(self.optim.betas)
        out["protocol"]["folds"] = list(self.protocol.folds)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------
# typed construction from plain data

_FLOAT_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values"
    if origin in (dict, collections.abc.Mapping) or tp in (dict, collections.abc.Mapping):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and "on" in choices and "off" in choices:
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a bool
        if value not in choices:
            raise bad
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, collections.abc.Mapping) or tp in (dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            raise bad
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
        raise bad
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        # YAML 1.1 reads "1e-5" (no dot) as a string; accept numeric strings for floats.
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")  # a bug in this module


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(repr(k) for k in unknown)} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        sub = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, sub)
        else:
            kwargs[key] = _coerce(value, tp, sub)
    return cls(**kwargs)


def _check_values(cfg: TrainConfig, where: str) -> TrainConfig:
    """Range checks (types are checked on construction); returns ``cfg`` with the ``model``
    overrides in canonical form (e.g. YAML's string "5e-1" for a float field as 0.5)."""
    o, d = cfg.optim, cfg.data
    checks = [
        (o.lr > 0, "optim.lr", "must be > 0"),
        (o.batch_size >= 2, "optim.batch_size", "must be >= 2 (the contrastive losses need pairs)"),
        (o.epochs >= 1, "optim.epochs", "must be >= 1"),
        (o.eval_batch_size >= 1, "optim.eval_batch_size", "must be >= 1"),
        (o.grad_clip >= 0, "optim.grad_clip", "must be >= 0"),
        (o.weight_decay >= 0, "optim.weight_decay", "must be >= 0"),
        (len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
         f"must be two numbers in [0, 1) (got {list(o.betas)})"),
        (cfg.seed >= 0, "seed", f"must be >= 0 (got {cfg.seed})"),
        (0 < d.val_fraction < 1, "data.val_fraction", "must be in (0, 1)"),
        (d.num_workers >= 0, "data.num_workers", "must be >= 0"),
        (all(f >= 1 for f in cfg.protocol.folds), "protocol.folds", "folds are 1-based"),
        (len(set(cfg.protocol.folds)) == len(cfg.protocol.folds), "protocol.folds",
         f"names a fold more than once ({list(cfg.protocol.folds)})"),
        (re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device) is not None, "device",
         f"must be auto, cpu, cuda or cuda:N (got {cfg.device!r})"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"{where}: {key} {msg}")
    if cfg.model:
        from cmarr.model import CMARRConfig

        names = {f.name for f in dataclasses.fields(CMARRConfig)}
        unknown = sorted(set(cfg.model) - names - {"variant"})
        if "variant" in cfg.model:
            raise ConfigError(f"{where}: model.variant: set the variant at the top level ('variant:' or --variant)")
        for key in ("dims", "num_classes"):
            if key in cfg.model:
                raise ConfigError(f"{where}: model.{key} is not a setting: it comes from the feature store "
                                  "(the widths of its features, the four classes)")
        if unknown:
            raise ConfigError(f"{where}: unknown model key{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join('model.' + k for k in unknown)} (see cmarr.model.CMARRConfig)")
        hints = typing.get_type_hints(CMARRConfig)
        return dataclasses.replace(cfg, model={key: _coerce(value, hints[key], f"{where}: model.{key}")
                                               for key, value in cfg.model.items()})
    return cfg


def config_from_dict(data: Mapping[str, Any] | None, where: str = "<config>") -> TrainConfig:
    """A checked :class:`TrainConfig` from plain data (a parsed YAML document)."""
    try:
        cfg = _build(TrainConfig, data or {}, "")
    except ConfigError as e:
        raise ConfigError(f"{where}: {str(e).removeprefix(': ')}") from None
    return _check_values(cfg, where)


#: The configs installed with the package, by name (``--config iemocap``).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def packaged_configs() -> list[str]:
    """Names of the packaged configs (``pipelines/configs/<name>.yaml``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config(path: str | Path) -> Path:
    """A config path, or the packaged config of that name (``iemocap``, ``iemocap.yaml``): a file
    that exists wins over a packaged name."""
    p = Path(path)
    if p.exists() or p.parent != Path("."):
        return p
    packaged = CONFIG_DIR / (p.name if p.suffix == ".yaml" else p.name + ".yaml")
    if packaged.is_file():
        return packaged
    raise ConfigError(f"{p}: no such config file, and no packaged config of that name "
                      f"(packaged: {', '.join(packaged_configs())})")


def load_config(path: str | Path | None) -> TrainConfig:
    """Read a YAML config file, given by path or by packaged name (``None`` = the defaults)."""
    if path is None:
        return config_from_dict({})
    p = resolve_config(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory, not a config file")
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a UTF-8 text file (byte {e.start} is 0x{e.object[e.start]:02x}); "
                          "save it as UTF-8 YAML") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot be read ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{p}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return config_from_dict(data, str(p))


def _known_keys(section: str | None) -> list[str]:
    """The keys of a config section (``None``: the top level; "model": CMARRConfig's fields)."""
    if section == "model":
        from cmarr.model import CMARRConfig

        return sorted(f.name for f in dataclasses.fields(CMARRConfig) if f.name not in ("dims", "num_classes"))
    cls = TrainConfig if section is None else typing.get_type_hints(TrainConfig).get(section)
    return sorted(f.name for f in dataclasses.fields(cls))


def _key_type(dotted: str, where: str) -> Any:
    """The annotation of the config key ``dotted`` (``optim.lr``, ``model.beta``, ``seed``);
    ``ConfigError`` listing the keys of its section when there is no such key."""
    parts = dotted.split(".")
    hints = typing.get_type_hints(TrainConfig)
    if parts[0] not in hints:
        raise ConfigError(f"{where}: unknown key {dotted!r} (top-level keys: {', '.join(_known_keys(None))})")
    section, tp = parts[0], hints[parts[0]]
    if len(parts) == 1:
        return tp
    if section == "model":
        from cmarr.model import CMARRConfig

        model_hints = typing.get_type_hints(CMARRConfig)
        if len(parts) == 2 and parts[1] in ("dims", "num_classes", "variant"):
            return Any  # refused with its own reason by _check_values
        if len(parts) != 2 or parts[1] not in model_hints:
            raise ConfigError(f"{where}: unknown key {dotted!r} (model keys: {', '.join(_known_keys('model'))})")
        return model_hints[parts[1]]
    if not dataclasses.is_dataclass(tp) or len(parts) != 2 or parts[1] not in typing.get_type_hints(tp):
        raise ConfigError(f"{where}: unknown key {dotted!r}"
                          + (f" ({section} keys: {', '.join(_known_keys(section))})" if dataclasses.is_dataclass(tp)
                             else f" ({section} has no sub-keys)"))
    return typing.get_type_hints(tp)[parts[1]]


def _accepts_none(tp: Any) -> bool:
    return tp is Any or tp is type(None) or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                                             and type(None) in typing.get_args(tp))


def with_overrides(cfg: TrainConfig, overrides: Mapping[str, Any], where: str = "command line") -> TrainConfig:
    """``cfg`` with dotted-key overrides applied (``{"optim.epochs": 3, "seed": 1}``). Every
    key must exist (``ConfigError`` listing the keys of its section otherwise), and a value
    of None (``--set optim.lr=``) is refused unless the key takes null."""
    data = cfg.to_dict()
    for dotted, value in overrides.items():
        tp = _key_type(dotted, where)
        if value is None and not _accepts_none(tp):
            wanted = "a mapping" if dataclasses.is_dataclass(tp) else _type_name(tp)
            raise ConfigError(f"{where}: {dotted} needs a value ({wanted}), got none (e.g. --set optim.lr=1e-4)")
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node[part]
        if isinstance(value, Mapping) and isinstance(node.get(parts[-1]), dict):
            value = {**node[parts[-1]], **value}  # a section's keys given at once: the others stay
        node[parts[-1]] = value
    return config_from_dict(data, where)


def parse_set_option(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-4"`` -> ``("optim.lr", 1e-4)`` (the value is read as YAML; an empty
    one is None, which :func:`with_overrides` accepts only for keys that take null)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {text!r}: no key before '=' (e.g. optim.lr=1e-4)")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value
