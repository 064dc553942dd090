"""Building a run: the accelerator, the data, the method, the model and its optimizer."""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from scbch_dist import dist, models
from scbch_dist.config import Config, ConfigError
from scbch_dist.errors import ScbchError
from scbch_dist.data.fingerprint import dataset_fingerprint
from scbch_dist.data.format import DatasetMeta, read_meta
from scbch_dist.data.labels import held_out_ids
from scbch_dist.data.noise import (NoiseSpec, clean_training_labels, corrupted_rows, noise_statistics,
                                   training_labels)
from scbch_dist.data.pipeline import TrainStream
from scbch_dist.data.remote import configured_root, is_remote
from scbch_dist.data.transforms import check_backbones_fit, make_transforms
from scbch_dist.engine.bank import BankSource
from scbch_dist.engine.encode import encode_part
from scbch_dist.methods import Method, TrainingSet, get_method
from scbch_dist.models import HashingModel
from scbch_dist.models.tokenizers import make_tokenizer


# accelerate's distributed types that run their processes on CUDA devices
CUDA_LAUNCHES = ("MULTI_GPU", "DEEPSPEED", "FSDP", "MEGATRON_LM")
CPU_LAUNCH = ("`torchrun --standalone --nproc_per_node 2 -m scbch_dist.train ...` or `accelerate launch --config_file "
              "configs/accelerate/cpu_2proc.yaml -m scbch_dist.train ...` (use_cpu: true)")


def accelerate_launch_args() -> tuple[list[str], str] | None:
    """The arguments after ``accelerate launch`` of the launcher that started this process, and the
    launcher's working directory; None when no accelerate launch did. Its multi-process launcher
    hands the workers neither distributed_type nor use_cpu (ACCELERATE_MIXED_PRECISION and the
    dynamo settings only), so the config is found where the launcher found it: its command line."""
    import os

    if "ACCELERATE_DYNAMO_BACKEND" not in os.environ:  # every accelerate launch sets it: no process lookup without
        return None
    try:
        import psutil  # an accelerate requirement
    except ImportError:
        return None
    try:
        for process in psutil.Process().parents()[:3]:  # the launcher; DeepSpeed's runs one more process between
            argv = process.cmdline()
            for i, arg in enumerate(argv):
                if Path(arg).name == "accelerate" and argv[i + 1:i + 2] == ["launch"]:
                    return argv[i + 2:], process.cwd()
                if Path(arg).name == "accelerate-launch" or arg == "accelerate.commands.launch":
                    return argv[i + 1:], process.cwd()
    except psutil.Error:  # a launcher gone or not ours to read: nothing to check
        return None
    return None


def gpu_launch_without_gpus(launch_args: list[str], cwd: str, cuda: bool) -> str | None:
    """Why ``accelerate launch <launch_args>`` (run in ``cwd``) cannot train here, or None: it asks
    for GPUs (a GPU distributed_type without use_cpu: true, or a GPU flag, and neither --cpu nor
    ACCELERATE_USE_CPU=true) and the machine has none, where the workers would otherwise run on
    the CPU in the config's process count and precision (accelerate_config.yaml: 8 processes in bf16)."""
    if cuda:
        return None
    import os

    from accelerate.commands.config.config_args import default_config_file, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    try:
        args = launch_command_parser().parse_args(launch_args)  # parsed as the launcher parsed them
    except SystemExit:
        return None
    from accelerate.utils import parse_flag_from_env

    # --cpu, or Accelerate's switch for it in the environment the launcher passes its workers on
    if args.cpu or parse_flag_from_env("ACCELERATE_USE_CPU"):
        return None
    for flag in ("multi_gpu", "use_deepspeed", "use_fsdp", "use_megatron_lm"):
        if getattr(args, flag, False):
            return f"accelerate launch --{flag} asks for GPUs and this machine has none; on CPUs launch with {CPU_LAUNCH}"
    config_file = args.config_file or (default_config_file if os.path.isfile(default_config_file) else None)
    if config_file is None:
        return None
    try:
        config = load_config_from_file(str(Path(cwd, config_file)))
    except Exception:  # noqa: BLE001 - the launcher read it; what it makes of a file it cannot is its own message
        return None
    kind = getattr(config.distributed_type, "value", str(config.distributed_type))
    if kind not in CUDA_LAUNCHES or config.use_cpu:
        return None
    return (f"{config_file}: distributed_type: {kind} with use_cpu: false asks for GPUs and this machine has none; "
            f"on CPUs launch with {CPU_LAUNCH}")


def make_accelerator(cfg: Config, run_dir: Path):
    """An Accelerator for this run; TensorBoard through its tracker when requested and installed."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from scbch_dist.engine.runlog import tensorboard_available

    launch = accelerate_launch_args()
    # before Accelerator(): refused on every rank alike, before any rank waits for another
    refusal = gpu_launch_without_gpus(*launch, cuda=torch.cuda.is_available()) if launch is not None else None
    if refusal is not None:
        raise ConfigError(refusal)
    if cfg.train.keep_freed_memory:
        keep_freed_memory()
    use_tb = cfg.run.tensorboard and tensorboard_available()
    # Accelerate keeps its state (mixed precision, ...) for the life of the process; a second run
    # in the same process (a notebook, a test) with another train.mixed_precision must start
    # afresh. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    # Without cpu=True, Accelerate under torchrun on a machine without CUDA starts the process
    # group yet reports one process per rank; every rank would then act as the main one.
    launcher = os.environ.get(LAUNCHER_PRECISION)
    chosen = precision(cfg.train.mixed_precision, launcher)
    if (chosen or launcher) == "fp16" and not torch.cuda.is_available():
        # Accelerate would take it and run float32 while it reports fp16
        where = "train.mixed_precision=fp16" if chosen else "the launcher's --mixed_precision fp16 (train.mixed_precision=\"\")"
        raise ConfigError(f"{where}: fp16 autocast runs on CUDA GPUs only and this machine has none; "
                          "set train.mixed_precision to bf16, auto or no")
    accelerator = Accelerator(log_with="tensorboard" if use_tb else None, project_dir=str(run_dir),
                              cpu=not torch.cuda.is_available(), mixed_precision=chosen)
    if dist.world_size() != accelerator.num_processes:
        raise ConfigError(f"Accelerate sees {accelerator.num_processes} process(es) but torch.distributed "
                         f"{dist.world_size()}; launch with accelerate launch or torchrun and a matching config")
    if cfg.train.batch_size % accelerator.num_processes:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must divide over {accelerator.num_processes} processes")
    return accelerator


def prepare_dataset(cfg: Config, log: logging.Logger, *, may_generate: bool = True) -> tuple[Path, DatasetMeta]:
    """The dataset folder and its meta. With data.generate=synthetic (or shapes) the main process
    writes that embedded dataset on first use, or checks that an existing folder matches the
    settings. ``may_generate=False`` (data.root given on the command line without data.generate):
    nothing is written, and a folder without a dataset is an error, so that a mistyped or empty
    data.root is never filled with synthetic data and trained on."""
    root = configured_root(cfg.data)
    error = None
    if cfg.data.generate and dist.is_main():
        try:
            if is_remote(root) and may_generate:  # (given on the command line, it is read as it is)
                raise ConfigError(f"data.generate={cfg.data.generate} writes its dataset at data.root, which must "
                                  f"then be a local folder, not {root}; publish the folder it wrote and give its "
                                  "URL as data.root without data.generate")
            exists = is_remote(root) or (root / "meta.json").is_file()
            if not may_generate and not exists:
                raise ConfigError(f"data.root={root}: no dataset there (no meta.json); the config generates the "
                                  f"embedded {cfg.data.generate} dataset only at the data.root it names; to write it "
                                  f"at {root}, add --set data.generate={cfg.data.generate}")
            if may_generate:  # (otherwise the folder holds the user's own dataset: it is read as it is)
                if not exists:
                    log.info(f"writing the embedded {cfg.data.generate} dataset to {root} (first use)")
                if cfg.data.generate == "shapes":
                    from scbch_dist.data.shapes import ensure_shapes

                    ensure_shapes(root, cfg.shapes)
                else:
                    from scbch_dist.data.synthetic import ensure_synthetic

                    ensure_synthetic(root, cfg.synthetic)
        except ScbchError as e:
            error = e
    dist.raise_together(error, f"the main process could not prepare the dataset at {root} (its message is above)")
    return root, read_meta(root)


@dataclass
class TrainingData:
    """Everything the loop reads: the dataset, the training labels, the stream and the transforms."""

    root: Path
    meta: DatasetMeta
    noise_spec: str  # data.noise as given
    noise: NoiseSpec
    train: TrainingSet
    stream: TrainStream
    eval_transform: Callable | None  # deterministic loader transform of raw datasets
    vocab_size: int | None  # the tokenizer's, for randomly initialised text encoders
    fingerprint: dict  # what the run trains on, as digests (data.fingerprint), on the main process ({} elsewhere):
    # it writes the run state that records it and checks a resume against it
    held_out: np.ndarray | None = None  # (N,) bool: the validation rows (eval.validation), never trained on

    def noise_info(self) -> dict:
        """The noise model, its parameter, and what it did to the clean labels (noise_statistics)."""
        corrupted = int(self.train.corrupted.sum()) if self.train.corrupted is not None else 0
        info = {"spec": self.noise_spec, "name": self.noise.name, "model": self.noise.kind, "parameter": self.noise.rate,
                "corrupted_rows": corrupted, "rate": round(corrupted / self.train.count, 4)}
        if self.noise.kind != "none":
            info["statistics"] = noise_statistics(self.train.clean, self.train.labels.cpu().numpy())
        return info


def has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this machine computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with
    the AVX-512 BF16 or AMX-BF16 instructions (the flags of Linux's ``cpuinfo``)."""
    if torch.cuda.is_available():
        try:  # by default torch counts the emulation of older GPUs (V100, T4) as support
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # a torch without the argument: Ampere (8.0) and later compute it natively
            return torch.cuda.get_device_capability() >= (8, 0)
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:  # not Linux: no way to tell here, so not assumed
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
KEEP_BLOCKS_UP_TO = 1 << 30  # bytes: blocks up to this size come from the heap and stay there when freed


def keep_freed_memory() -> bool:
    """Lets glibc's malloc keep freed memory for the next allocation instead of returning it to the
    system: a training step frees and reallocates its large buffers (activations, gradients, bf16
    copies of the weights: hundreds of MB at width 8192), and by default every one is a fresh mmap
    whose pages fault in again. Returns whether it applied (Linux with glibc). What it saves:
    docs/benchmarks.md, "Where a paper-width step goes"."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    big = ctypes.c_int(2**31 - 1)
    return all(mallopt(option, value) == 1 for option, value in ((M_MMAP_THRESHOLD, ctypes.c_int(KEEP_BLOCKS_UP_TO)),
                                                                 (M_TRIM_THRESHOLD, big),
                                                                 (M_TOP_PAD, ctypes.c_int(KEEP_BLOCKS_UP_TO))))


LAUNCHER_PRECISION = "ACCELERATE_MIXED_PRECISION"  # what accelerate launch passes its workers


def launcher_asks(launcher: str | None) -> bool:
    """Whether the launcher's precision (ACCELERATE_MIXED_PRECISION, which ``accelerate launch`` sets
    from its --mixed_precision or its config, and to "no" when neither names one) is a request that
    ``auto`` takes: bf16, or fp16 where CUDA runs it (Accelerate's fp16 autocast is CUDA's only)."""
    return launcher == "bf16" or (launcher == "fp16" and torch.cuda.is_available())


def _auto_precision(launcher: str | None) -> tuple[str, str]:
    """What "auto" picks: the launcher's bf16 or fp16 when it asks for one (launcher_asks), else bf16
    where the hardware computes it natively (has_native_bf16), else "no"; and why, in words."""
    if launcher_asks(launcher):
        return launcher, f"the launcher's {launcher}"
    native = has_native_bf16()
    return ("bf16" if native else "no"), f"{'native' if native else 'no native'} bf16 here"


def precision(setting: str, launcher: str | None = None) -> str | None:
    """train.mixed_precision as Accelerate takes it: "auto" (the default) as _auto_precision picks
    it; "" leaves Accelerate's own setting."""
    return _auto_precision(launcher)[0] if setting == "auto" else setting or None


def resolve_precision(cfg: Config, launcher: str | None) -> tuple[Config, str]:
    """A new run's config with train.mixed_precision=auto resolved to what it picks here (config.yaml
    then records it, so a resume on other hardware or under another launcher goes on at the same
    precision), and why, for the run log ("" when the setting is not auto)."""
    if cfg.train.mixed_precision != "auto":
        return cfg, ""
    chosen, why = _auto_precision(launcher)
    return replace(cfg, train=replace(cfg.train, mixed_precision=chosen)), f" (train.mixed_precision=auto: {why})"


def build_data(cfg: Config, accelerator, log: logging.Logger, *, may_generate: bool = True) -> TrainingData:
    root, meta = prepare_dataset(cfg, log, may_generate=may_generate)
    label_np, noise = training_labels(root, meta, cfg.data.noise, seed=cfg.data.noise_seed)
    clean_np = np.asarray(clean_training_labels(root, meta))
    corrupted = corrupted_rows(clean_np, label_np) if noise.kind != "none" else None
    labels = torch.from_numpy(np.array(label_np, dtype=np.uint8)).to(accelerator.device)
    check_backbones_fit(cfg.model, meta, root)
    tokenizer = make_tokenizer(cfg.model, root) if meta.kind("txt") == "text" else None
    train_transform, eval_transform = make_transforms(cfg.model.image, meta, tokenizer)
    world = accelerator.num_processes
    held_out = validation_rows(cfg, meta.splits["train"].count)
    stream = TrainStream(root=root, meta=meta, batch_size=cfg.train.batch_size // world, seed=cfg.train.seed,
                         rank=accelerator.process_index, world=world, workers=cfg.data.workers,
                         buffer=cfg.data.shuffle_buffer, drop_last=cfg.train.drop_last, transform=train_transform,
                         held_out=held_out)
    train = TrainingSet(count=meta.splits["train"].count, num_classes=meta.num_classes, labels=labels,
                        corrupted=corrupted, device=accelerator.device, clean=clean_np)
    data = TrainingData(root, meta, cfg.data.noise, noise, train, stream, eval_transform,
                        tokenizer.vocab_size if tokenizer is not None else None,
                        dataset_fingerprint(root, label_np) if dist.is_main() else {}, held_out)
    info = data.noise_info()
    log.info(f"dataset {meta.name} at {root}: {meta.describe()}; noise {noise.name} ({info['corrupted_rows']} "
             f"corrupted training rows" + ("; {labels_added_per_row:.2f} labels added and {labels_removed_per_row:.2f} "
                                           "removed per row, {false_candidate_fraction:.1%} of the candidate labels "
                                           "false".format(**info["statistics"]) if "statistics" in info else "") + ")"
             + (f"; {int(held_out.sum())} training rows held out for validation (eval.validation)"
                if held_out is not None else ""))
    return data


def validation_rows(cfg: Config, count: int) -> np.ndarray | None:
    """(count,) bool: the training rows eval.validation holds out (data.labels.held_out_ids), or None."""
    rows = cfg.eval.validation
    if not rows:
        return None
    if rows > count // 2:
        raise ConfigError(f"eval.validation={rows}: more than half of the {count} training rows; hold out at most "
                          f"{count // 2}")
    mask = np.zeros(count, dtype=bool)
    mask[held_out_ids(count, rows)] = True
    return mask


def method_class(cfg: Config) -> type[Method]:
    """The class ``method.name`` names (load_config has checked that it is registered)."""
    return get_method(cfg.method.name)


def build_network(method: type[Method], cfg: Config, meta: DatasetMeta, vocab_size: int | None = None) -> HashingModel:
    """The network ``method`` trains on a dataset of ``meta``: its towers (``method.tower_spec``) and
    head (``method.build_head``), initialised from train.seed, towers first, then the head.
    ``vocab_size``: the tokenizer's, for a randomly initialised text encoder. Training builds it here,
    and so does a query of a finished run (retrieval.query), whose weights then replace the draw."""
    torch.manual_seed(cfg.train.seed)
    return models.build_model(cfg.model, meta, spec=method.tower_spec(cfg),
                              make_head=lambda: method.build_head(cfg, meta.num_classes), vocab_size=vocab_size)


def build_bank(cfg: Config, data: TrainingData, model: torch.nn.Module, accelerator, log: logging.Logger) -> BankSource:
    """The training-set bank refreshes search: a pass of ``model`` over the training split, or the
    memory of the training batches (bank.refresh), gathered or sharded over the ranks (bank.shard)."""
    def encode_train() -> dict[str, torch.Tensor]:
        return encode_part(model, data.root, data.meta, "train", batch_size=cfg.eval.batch_size,
                           device=accelerator.device, workers=cfg.data.workers, autocast=accelerator.autocast,
                           transform=data.eval_transform)

    dtype = torch.float16 if data.train.count >= cfg.bank.float16_above else torch.float32
    held_out = torch.from_numpy(data.held_out).to(accelerator.device) if data.held_out is not None else None
    return BankSource(cfg.bank.refresh, data.train.count, cfg.model.bits, accelerator.device, encode_train, log,
                      shard=cfg.bank.shard, dtype=dtype, held_out=held_out)


def make_optimizer(model: HashingModel, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """train.optimizer with L2 weight decay: Adam (SCBCH, RSHNL) or RMSprop (NACD), torch's defaults
    otherwise, as the published code; fine-tuned backbones at train.backbone_lr (layer by layer with
    train.layer_decay). The fused Adam kernel
    computes the same update in one pass over the parameters, much faster per step
    (docs/benchmarks.md, "Figures quoted in the code")."""
    groups = model.param_groups(cfg.train.lr, cfg.train.backbone_lr, cfg.train.layer_decay)
    kwargs = dict(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if cfg.train.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, **kwargs)
    try:
        return torch.optim.Adam(groups, fused=device.type in ("cpu", "cuda"), **kwargs)
    except (RuntimeError, TypeError):  # a torch or device without the fused kernel
        return torch.optim.Adam(groups, **kwargs)


def configure_deepspeed(ds_config: dict, global_batch: int, world: int) -> dict:
    """Fill the batch fields of a DeepSpeed config that Accelerate leaves at "auto" when no
    DataLoader goes through accelerator.prepare (ours is split by rank in webdataset). One
    optimizer step per batch: gradient accumulation stays 1."""
    ds_config["train_micro_batch_size_per_gpu"] = global_batch // world
    ds_config["gradient_accumulation_steps"] = 1
    ds_config["train_batch_size"] = global_batch
    return ds_config


def prepare(accelerator, model: HashingModel, optimizer: torch.optim.Optimizer, cfg: Config):
    """Model and optimizer through accelerator.prepare (DDP or DeepSpeed as launched)."""
    if accelerator.state.deepspeed_plugin is not None:
        configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, cfg.train.batch_size,
                            accelerator.num_processes)
    return accelerator.prepare(model, optimizer)


def log_model(run, precision_note: str = "") -> None:
    """One line: the model's size, the processes, precision (``precision_note``: why, from
    resolve_precision), batch and the method."""
    cfg, model = run.cfg, run.accelerator.unwrap_model(run.model)
    n_params = sum(p.numel() for p in run.model.parameters())
    n_backbone = sum(p.numel() for m in (model.img_backbone, model.txt_backbone) for p in m.parameters())
    run.log.info(f"model: {cfg.model.bits} bits, hidden {cfg.model.hidden}, {n_params / 1e6:.2f}M parameters "
                 f"({n_backbone / 1e6:.2f}M in backbones: image {cfg.model.image.kind}, text {cfg.model.text.kind}); "
                 f"{run.accelerator.num_processes} process(es) on {run.accelerator.device}, precision "
                 f"{run.accelerator.mixed_precision}"
                 + precision_note
                 + f"; global batch {cfg.train.batch_size}, "
                 f"{run.data.stream.steps_per_epoch} steps per epoch; method {cfg.method.name}, "
                 f"refresh {cfg.bank.refresh}")
