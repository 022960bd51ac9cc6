"""Supervised fine-tuning of QWen: data files -> ChatML samples, the collator (padding or packing), full /
LoRA / Q-LoRA setup on the HF Trainer, and saving a checkpoint every script can load.

`finetune.py` parses the flags (the original's names) and calls `train()`. Data formats:
  - the original: a JSON list (or JSONL) of {"id", "conversations": [{"from": "user"|"assistant", "value"}]};
    a leading non-user turn is dropped, as the original did; an optional "system" key sets the system prompt;
  - OpenAI style: {"messages": [{"role", "content", "tool_calls"...}], "tools"/"functions"}: folded by
    qwen.react.parse_messages into the same ReAct prompt the API server builds, so tool use is trained exactly
    as it is served.
Ids and labels come from qwen_generation_utils.render_chatml (equal to the original preprocess()).
"""

import json
import math
import os
import resource
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from qwen_generation_utils import DEFAULT_SYSTEM, chatml_turn, eod_id, render_chatml

from .errors import DataError, UsageError

IGNORE_INDEX = -100  # labels the loss skips (torch's CrossEntropyLoss default)
ORIGINAL_ROLES = ("user", "assistant")  # the original format's "from" values
# --lora_target_modules presets; "qwen" is the original's default list (c_proj is in both attn and mlp).
LORA_TARGET_PRESETS = {
    "qwen": ["c_attn", "c_proj", "w1", "w2"],
    "attention": ["c_attn", "attn.c_proj"],
    "mlp": ["w1", "w2", "mlp.c_proj"],
    "all-linear": "all-linear",
}
# A base model has never seen the ChatML tokens: their embeddings and output rows must be learned too.
BASE_MODEL_MODULES_TO_SAVE = ["wte", "lm_head"]
# Flags of the original's launch commands that transformers has since renamed: old -> new.
RENAMED_FLAGS = {
    "--evaluation_strategy": "--eval_strategy",
    "--warmup_ratio": "--warmup_steps",  # a float in [0, 1) is a ratio of the total steps
}


# ------------------------------------------------------------------------------------------------ arguments


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "hub id or checkpoint directory (default: the offline demo model)"}
    )


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "training data: JSON list or JSONL"})
    eval_data_path: str | None = field(default=None, metadata={"help": "evaluation data, same formats"})
    lazy_preprocess: bool = field(
        default=False,
        metadata={"help": "accepted for the original's commands; samples are always tokenized up front so "
                  "bad data fails before training and truncation is counted"},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "pack each batch's samples into one row (positions restart per sample, attention "
                  "stays inside each sample): no padding at all"},
    )
    system_message: str = field(default=DEFAULT_SYSTEM, metadata={"help": "system prompt of samples without one"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(default=None)
    optim: str = field(default="adamw_torch")
    model_max_length: int = field(
        default=8192, metadata={"help": "longest sample in tokens; longer ones are cut (and counted)"}
    )
    use_lora: bool = field(default=False)

    def __post_init__(self):
        # torchrun on a machine without GPUs: train on the CPU over gloo, with DeepSpeed too. transformers and
        # accelerate only wire DeepSpeed to a GPU backend, so the process group is set up here and handed over.
        if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.ddp_backend = self.ddp_backend or "gloo"
            if self.deepspeed:
                _deepspeed_state_on_cpu(self.ddp_backend)
                if self.accelerator_config is None:
                    self.accelerator_config = {"use_configured_state": True}
            else:
                self.use_cpu = True
        super().__post_init__()


def _deepspeed_state_on_cpu(backend: str) -> None:
    """accelerate's process state for DeepSpeed over a CPU backend (it would otherwise run one process alone)."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # read once, by this PartialState
    try:
        PartialState(backend=backend)
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


@dataclass
class LoraArguments:
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_TARGET_PRESETS["qwen"]),
        metadata={"help": f"module names, or one preset: {', '.join(LORA_TARGET_PRESETS)}"},
    )
    lora_weight_path: str = field(default="", metadata={"help": "unused, as in the original"})
    lora_bias: str = field(default="none", metadata={"choices": ["none", "all", "lora_only"]})
    q_lora: bool = field(default=False, metadata={"help": "LoRA on the model quantized to 4-bit nf4"})


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainingArguments, LoraArguments)


def modernize_argv(argv: Sequence[str]) -> list[str]:
    """The original's commands as today's transformers reads them (renamed flags; --group_by_length [True])."""
    out, args = [], list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name == "--group_by_length":
            if not eq and i + 1 < len(args) and args[i + 1].lower() in ("true", "false"):
                value, i = args[i + 1], i + 1
            if (value or "true").lower() == "true":
                out += ["--train_sampling_strategy", "group_by_length"]
        else:
            out.append(RENAMED_FLAGS.get(name, name) + eq + value if name in RENAMED_FLAGS else arg)
        i += 1
    return out


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False  # cut at model_max_length
    has_answer: bool = True  # an assistant token survived the cut

    @property
    def supervised_tokens(self) -> int:
        """Tokens the loss learns: labels after the first (a causal LM never predicts position 0)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def read_records(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """[(where, record), ...] of a JSON list or JSONL file; `where` names the file and sample for messages."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file (--data_path / --eval_data_path)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped.startswith("["):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") from None
        records = [(f"{path}, sample {i}", record) for i, record in enumerate(data)]
    else:  # JSONL: one sample per non-empty line
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}, sample {len(records)} (line {line_number})"
            try:
                records.append((where, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{where}: not JSON ({exc.msg}); the file must be a JSON list or one JSON object per line"
                ) from None
    if not records:
        raise DataError(f"{path}: no samples in the file")
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{where}: a sample must be a JSON object, not {type(record).__name__}")
    return records


def _original_turns(record: dict, where: str) -> list[tuple[str, str]]:
    conversations = record["conversations"]
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: \"conversations\" must be a non-empty list of {{\"from\", \"value\"}} turns")
    turns = []
    for j, turn in enumerate(conversations):
        at = f"{where}, turn {j}"
        if not isinstance(turn, dict):
            raise DataError(f"{at}: a turn must be an object {{\"from\": ..., \"value\": ...}}")
        role, value = turn.get("from"), turn.get("value")
        if role not in ORIGINAL_ROLES:
            raise DataError(f"{at}: unknown role {role!r} in \"from\"; use \"user\" or \"assistant\"")
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{at}: empty \"value\" (every turn needs text)")
        turns.append((role, value))
    if turns[0][0] != "user":  # as the original preprocess(): one leading non-user turn is dropped
        turns = turns[1:]
    if not any(role == "user" for role, _ in turns):
        raise DataError(f"{where}: no user turn (a conversation starts with the user)")
    return turns


def _messages_turns(record: dict, where: str) -> tuple[str, list[tuple[str, str]]]:
    from .react import ReActError, normalize_tools, parse_messages

    messages = record["messages"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for j, message in enumerate(messages):
        content = message.get("content")
        if message.get("role") in ("user", "system", "developer") and not (
            isinstance(content, list) or (isinstance(content, str) and content.strip())
        ):
            raise DataError(f"{where}, messages[{j}]: empty content")
    if messages[-1].get("role") not in ("assistant", "tool", "function"):
        raise DataError(f"{where}: the last message must be the assistant's reply (that is what is learned)")
    try:
        functions = normalize_tools(record.get("tools"), record.get("functions"))
        # parse_messages builds a prompt for the next reply: an empty query closes the conversation, and every
        # completed turn comes back in `history` exactly as the server would render it.
        parsed = parse_messages([*messages, {"role": "user", "content": ""}], functions)
    except ReActError as exc:
        raise DataError(f"{where}: {exc}") from None
    turns = [(role, text) for query, reply in parsed.history for role, text in (("user", query), ("assistant", reply))]
    return parsed.system, turns


def conversation(record: dict, where: str, default_system: str = DEFAULT_SYSTEM) -> tuple[str, list[tuple[str, str]]]:
    """(system, [(role, content), ...]) of one sample in either format; DataError naming file/sample/problem."""
    if "conversations" in record:
        turns = _original_turns(record, where)
        system = record.get("system", default_system)
        if not isinstance(system, str):
            raise DataError(f"{where}: \"system\" must be a string")
        return system, turns
    if "messages" in record:
        return _messages_turns(record, where)
    raise DataError(f"{where}: no \"conversations\" (original format) or \"messages\" (OpenAI format) key")


def encode_conversation(tokenizer, system: str, turns: Sequence[tuple[str, str]], max_len: int) -> Sample:
    """ChatML ids and labels of a conversation, cut at `max_len` as the original preprocess() cut them."""
    ids, mask = render_chatml(tokenizer, turns, system=system)
    labels = [token if learned else IGNORE_INDEX for token, learned in zip(ids, mask, strict=True)]
    if len(ids) <= max_len:
        return Sample(ids, labels)
    first_answer = next((k for k, (role, _) in enumerate(turns) if role == "assistant"), None)
    has_answer = False
    if first_answer is not None:  # the first assistant content token sits after its turn's "<|im_start|>assistant\n"
        before, _ = render_chatml(tokenizer, turns[:first_answer], system=system)
        has_answer = max_len > len(before) + len(chatml_turn(tokenizer, "assistant", None)[0])
    return Sample(ids[:max_len], labels[:max_len], truncated=True, has_answer=has_answer)


def pad_like_original(sample: Sample, max_len: int, pad_id: int) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, labels, attention_mask) as the original collated every sample: right-padded with
    <|endoftext|> to `max_len`, and the mask `ids != <|endoftext|>` (which also hid real ones)."""
    pad = max_len - len(sample.input_ids)
    ids = sample.input_ids + [pad_id] * pad
    labels = sample.labels + [IGNORE_INDEX] * pad
    return ids, labels, [int(token != pad_id) for token in ids]


@dataclass
class DataReport:
    path: str
    samples: int = 0
    truncated: int = 0
    dropped: int = 0
    supervised_tokens: int = 0

    def lines(self, max_len: int) -> list[str]:
        out = [f"{self.path}: {self.samples} samples, {self.supervised_tokens} supervised tokens"]
        if self.truncated:
            out.append(f"  {self.truncated} samples longer than --model_max_length {max_len} were cut")
        if self.dropped:
            out.append(f"  {self.dropped} samples had no assistant token left after the cut and were dropped")
        return out


def load_conversations(path, default_system: str = DEFAULT_SYSTEM) -> list[tuple[str, list[tuple[str, str]]]]:
    """Every sample of a data file as (system, turns), validated (needs no tokenizer: runs before loading)."""
    return [conversation(record, where, default_system) for where, record in read_records(path)]


def calibration_samples(tokenizer, data_path: str | os.PathLike, max_len: int, limit: int | None = None) -> list[dict]:
    """Calibration inputs from a fine-tuning data file (any format finetune.py reads, validated the same way),
    rendered by the shared ChatML renderer and cut at max_len tokens, as the original run_gptq.py built them."""
    samples = []
    for system, turns in load_conversations(data_path)[:limit]:
        ids = encode_conversation(tokenizer, system, turns, max_len).input_ids
        samples.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return samples


class SupervisedDataset(torch.utils.data.Dataset):
    """The tokenized samples of one data file; cut samples are counted, ones with no answer left dropped."""

    def __init__(self, conversations, tokenizer, max_len: int, path: str = "data"):
        self.report = DataReport(str(path))
        self.samples: list[Sample] = []
        for system, turns in conversations:
            sample = encode_conversation(tokenizer, system, turns, max_len)
            self.report.truncated += sample.truncated
            if not sample.has_answer or sample.supervised_tokens == 0:
                self.report.dropped += 1
                continue
            self.samples.append(sample)
            self.report.supervised_tokens += sample.supervised_tokens
        self.report.samples = len(self.samples)
        if not self.samples:
            raise DataError(f"{path}: no sample is left to train on ({self.report.dropped} dropped: no assistant "
                            f"token within --model_max_length {max_len})")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        return {"input_ids": sample.input_ids, "labels": sample.labels}


@dataclass
class SFTCollator:
    """Batches of samples: right-padded to the batch's longest sample with the mask made from the lengths, or
    (packing) all samples in one row with position_ids restarting per sample and no padding at all.

    Packed rows carry no attention_mask: the model's create_causal_mask then reads the sample boundaries from
    the position_ids (transformers' packed-sequence path), so attention stays inside each sample with SDPA,
    eager and flash-attn alike. The first label of each sample is ignored so no sample predicts the next one's
    first token; it was never a target anyway (a causal LM predicts tokens 1..n), so the loss is unchanged.
    """

    pad_id: int
    packing: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self.packing:
            ids, labels, positions = [], [], []
            for f in features:
                ids += f["input_ids"]
                labels += [IGNORE_INDEX] + list(f["labels"][1:])
                positions += range(len(f["input_ids"]))
            return {
                "input_ids": torch.tensor([ids]),
                "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions]),
            }
        longest = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for f in features:
            pad = longest - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_id] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
        return {key: torch.tensor(value) for key, value in batch.items()}


# ------------------------------------------------------------------------------------------------ model


def is_chat_model(model) -> bool:
    """From the checkpoint's generation_config chat_format ("chatml" for -Chat models), never from its path."""
    return getattr(model.generation_config, "chat_format", None) == "chatml"


def lora_target_modules(names: Sequence[str]) -> list[str] | str:
    if len(names) == 1 and names[0] in LORA_TARGET_PRESETS:
        return LORA_TARGET_PRESETS[names[0]]
    return list(names)


def check_arguments(training_args: TrainingArguments, lora_args: LoraArguments, data_args: DataArguments) -> None:
    """UsageError for flag combinations that cannot work, before anything is loaded."""
    if data_args.data_path is None:
        raise UsageError("--data_path is required: a JSON list or JSONL file of conversations")
    if lora_args.q_lora and not training_args.use_lora:
        raise UsageError("--q_lora True needs --use_lora True (Q-LoRA trains LoRA adapters on a 4-bit model)")
    if lora_args.q_lora and _zero_stage(training_args) == 3:
        raise UsageError("--q_lora does not work with ZeRO-3 (4-bit weights cannot be partitioned): use "
                         "finetune/ds_config_zero2.json")
    if training_args.model_max_length < 2:
        raise UsageError("--model_max_length must be at least 2")


def _zero_stage(training_args) -> int:
    config = training_args.deepspeed
    if not config:
        return 0
    if isinstance(config, str):
        try:
            config = json.loads(Path(config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"--deepspeed {training_args.deepspeed}: cannot read the DeepSpeed config ({exc})") from None
    return int(config.get("zero_optimization", {}).get("stage", 0))


def _train_dtype(training_args) -> torch.dtype:
    if training_args.bf16:
        return torch.bfloat16
    return torch.float16 if training_args.fp16 else torch.float32


def _gptq_checkpoint(name: str | None) -> dict | None:
    """config.json of `name` when it is a GPTQ checkpoint (e.g. Qwen/Qwen-7B-Chat-Int4), else None."""
    if name is None:  # the demo model
        return None
    from .loading import check_checkpoint, resolve_checkpoint
    from .quantize import gptq_quantization

    config = check_checkpoint(resolve_checkpoint(name))
    return config if gptq_quantization(config) is not None else None


def load_for_training(model_args, training_args, lora_args):
    """(model, tokenizer) ready for the Trainer: full weights, or a PEFT model with LoRA (on 4-bit for Q-LoRA)."""
    from .loading import load_model_and_tokenizer

    dtype = _train_dtype(training_args)
    kwargs = {}
    if lora_args.q_lora and (gptq := _gptq_checkpoint(model_args.model_name_or_path)) is not None:
        # Q-LoRA on the hub's Int4 (or Int8) checkpoint, as the original: LoRA on top of the GPTQ layers, through a
        # GPT-QModel kernel with a backward pass.
        from .quantize import gptq_load_kwargs

        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        kwargs.update(gptq_load_kwargs(gptq, device, trainable=True))
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    elif lora_args.q_lora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path, device="cpu" if "device_map" not in kwargs else None, dtype=dtype,
        cache_dir=training_args.cache_dir, **kwargs,
    )
    model.config.use_cache = False  # no KV cache while training
    if not training_args.use_lora:
        return model, tokenizer

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=lora_target_modules(lora_args.lora_target_modules),
        bias=lora_args.lora_bias,
        task_type="CAUSAL_LM",
        modules_to_save=None if is_chat_model(model) else list(BASE_MODEL_MODULES_TO_SAVE),
    )
    if lora_args.q_lora:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=training_args.gradient_checkpointing
        )
    torch.manual_seed(training_args.seed)  # LoRA A's random init: the same --seed gives the same adapter
    model = get_peft_model(model, config)
    # The adapter names the base model as the user did (a hub id stays a hub id), or the demo model's path.
    model.peft_config["default"].base_model_name_or_path = (
        model_args.model_name_or_path or model.base_model.model.name_or_path
    )
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need inputs that require grad
    return model, tokenizer


def save_output(trainer, tokenizer, model, output_dir: str) -> None:
    """The trained model (or adapter), tokenizer and generation_config: a directory every script's -c loads."""
    trainer.save_model(output_dir)  # gathers ZeRO-3 shards; a PEFT model saves only its adapter
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output_dir)
        generation_config = getattr(model, "generation_config", None) or model.get_base_model().generation_config
        generation_config.save_pretrained(output_dir)
        apply_umask(output_dir)


def apply_umask(directory: str | os.PathLike) -> None:
    """Files written private (0600: safetensors >= 0.8 writes through a private temp file) get the mode the
    user's umask gives every other file, so a Docker mount or another user can read the weights."""
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) == 0o600:
            path.chmod(mode)


def merge_lora(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, shard_size: str = "2GB",
               base: str | None = None) -> Path:
    """A full checkpoint in the hub layout from a LoRA / Q-LoRA adapter directory: the adapter merged into the
    base weights (the unquantized ones for Q-LoRA), saved in the base checkpoint's dtype with the tokenizer and
    generation_config. `base` replaces the base model the adapter names: an adapter trained on a GPTQ Int4
    checkpoint merges into the matching bf16 one (Qwen-7B-Chat for Qwen-7B-Chat-Int4)."""
    from .errors import CheckpointError
    from .loading import ADAPTER_CONFIG, DTYPES, load_adapter_checkpoint, resolve_checkpoint

    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{adapter_dir} is not a LoRA adapter directory (it has no {ADAPTER_CONFIG})")
    base = base or json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    base_config = json.loads((resolve_checkpoint(base) / "config.json").read_text(encoding="utf-8")) if base else {}
    if "quantization_config" in base_config:
        raise CheckpointError(
            f"{base} is a quantized checkpoint: merge into the matching full-precision model instead, e.g. "
            "--base Qwen/Qwen-7B-Chat for an adapter trained on Qwen/Qwen-7B-Chat-Int4 (then re-quantize the merge "
            "with run_gptq.py if you want it quantized)."
        )
    model, tokenizer = load_adapter_checkpoint(adapter_dir, cpu_only=True, dtype="fp32", base=base)  # merge in fp32
    saved_dtype = DTYPES.get(str(base_config.get("torch_dtype") or base_config.get("dtype")))
    if saved_dtype is not None:  # the base checkpoint's own precision (bf16 on the hub)
        model = model.to(saved_dtype)
    model.save_pretrained(out, max_shard_size=shard_size)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    apply_umask(out)
    return out


# ------------------------------------------------------------------------------------------------ train


class SFTTrainer(transformers.Trainer):
    """The HF Trainer, counting the supervised tokens it trains on (evaluation batches are not counted)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained_tokens = 0  # supervised next-token targets of every training micro-batch, this process
        self.add_callback(OnlyRequestedCheckpoints())

    def training_step(self, model, inputs, *args, **kwargs):
        self.trained_tokens += int((inputs["labels"][..., 1:] != IGNORE_INDEX).sum())
        return super().training_step(model, inputs, *args, **kwargs)


class OnlyRequestedCheckpoints(transformers.TrainerCallback):
    """Checkpoints only where --save_strategy/--save_steps put them, as the original's transformers did: since 4.39
    the Trainer also writes one (optimizer state included) at the last step, next to the final model."""

    def on_step_end(self, args, state, control, **kwargs):
        last = state.global_step >= state.max_steps
        on_schedule = state.save_steps > 0 and state.global_step % state.save_steps == 0
        if last and args.save_strategy == transformers.trainer_utils.SaveStrategy.STEPS and not on_schedule:
            control.should_save = False
        return control

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            apply_umask(Path(args.output_dir) / f"checkpoint-{state.global_step}")


def _peak_memory() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"  # ru_maxrss is KiB


def _all_ranks_sum(value: int) -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        on_gpu = torch.distributed.get_backend() == "nccl"  # NCCL reduces GPU tensors only
        total = torch.tensor([value], dtype=torch.long, device=torch.cuda.current_device() if on_gpu else "cpu")
        torch.distributed.all_reduce(total)
        return int(total.item())
    return value


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
          lora_args: LoraArguments) -> dict:
    """Fine-tune; returns the summary (also printed on the main process)."""
    check_arguments(training_args, lora_args, data_args)
    # Bad data fails here, before a (possibly large) model is loaded.
    paths = [data_args.data_path] + ([data_args.eval_data_path] if data_args.eval_data_path else [])
    conversations = [load_conversations(path, data_args.system_message) for path in paths]
    model, tokenizer = load_for_training(model_args, training_args, lora_args)
    main_process = training_args.process_index == 0
    max_len = training_args.model_max_length
    train_data, *evals = [
        SupervisedDataset(samples, tokenizer, max_len, path) for samples, path in zip(conversations, paths, strict=True)
    ]
    eval_data = evals[0] if evals else None
    if main_process:
        for report in [train_data.report] + ([eval_data.report] if eval_data else []):
            print("\n".join(report.lines(max_len)), file=sys.stderr)

    collator = SFTCollator(pad_id=eod_id(tokenizer), packing=data_args.packing)
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=collator,
        processing_class=tokenizer,
    )
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last", "latest"):
        resume = True
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    trainer.save_state()
    save_output(trainer, tokenizer, model, training_args.output_dir)
    supervised = _all_ranks_sum(trainer.trained_tokens)
    summary = {
        "samples": train_data.report.samples,
        "truncated": train_data.report.truncated,
        "dropped": train_data.report.dropped,
        "supervised_tokens": supervised,
        "tokens_per_second": supervised / seconds if seconds else math.nan,
        "train_loss": result.training_loss,
        "peak_memory": _peak_memory(),
        "output_dir": training_args.output_dir,
        "processes": training_args.world_size,
        "deepspeed_zero_stage": _zero_stage(training_args) if trainer.is_deepspeed_enabled else None,
    }
    if eval_data is not None:
        summary["eval_loss"] = trainer.evaluate()["eval_loss"]
    if main_process:
        print(summary_text(summary), file=sys.stderr)
    return summary


def summary_text(summary: dict) -> str:
    lines = [
        "Fine-tuning done.",
        f"  samples           {summary['samples']} ({summary['truncated']} cut at --model_max_length, "
        f"{summary['dropped']} dropped)",
        f"  supervised tokens {summary['supervised_tokens']} trained, {summary['tokens_per_second']:.1f} tokens/s",
        f"  train loss        {summary['train_loss']:.4f}",
    ]
    if "eval_loss" in summary:
        lines.append(f"  eval loss         {summary['eval_loss']:.4f}")
    lines += [
        f"  processes         {summary['processes']}"
        + (f" (DeepSpeed ZeRO-{summary['deepspeed_zero_stage']})" if summary["deepspeed_zero_stage"] else ""),
        f"  peak memory       {summary['peak_memory']} (this process)",
        f"  output            {summary['output_dir']}",
        f"Chat with it:       python cli_demo.py -c {summary['output_dir']}",
    ]
    return "\n".join(lines)


__all__ = [
    "ARGUMENT_CLASSES", "IGNORE_INDEX", "SFTCollator", "Sample", "SupervisedDataset", "conversation", "load_conversations",
    "calibration_samples", "encode_conversation", "load_for_training", "merge_lora", "modernize_argv", "pad_like_original", "read_records", "train",
]
