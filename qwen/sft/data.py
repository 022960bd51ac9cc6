"""Fine-tuning data: JSON list / JSONL files in the original's or the OpenAI format -> (system, turns) -> ChatML
ids and labels (qwen_generation_utils.render_chatml, equal to the original preprocess()), cut and counted; the
collator pads each batch to its longest sample or packs it into one row.

Data formats:
  - the original: a JSON list (or JSONL) of {"id", "conversations": [{"from": "user"|"assistant", "value"}]};
    a leading non-user turn is dropped, as the original did; an optional "system" key sets the system prompt;
  - OpenAI style: {"messages": [{"role", "content", "tool_calls"...}], "tools"/"functions"}: folded by
    qwen.react.parse_messages into the same ReAct prompt the API server builds, so tool use is trained exactly
    as it is served.
"""

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_generation_utils import DEFAULT_SYSTEM, chatml_turn, render_chatml

from ..errors import DataError
from ..modeling_qwen import IGNORE_INDEX

ORIGINAL_ROLES = ("user", "assistant")  # the original format's "from" values


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
        except RecursionError:
            raise DataError(f"{path}: nested too deeply to be fine-tuning data") from None
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
            except RecursionError:
                raise DataError(f"{where}: nested too deeply to be fine-tuning data") from None
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
        if not isinstance(value, str):
            raise DataError(f"{at}: \"value\" must be a string, not {_json_type(value)}")
        if not value.strip():
            raise DataError(f"{at}: empty \"value\" (every turn needs text)")
        turns.append((role, value))
    if turns[0][0] != "user":  # as the original preprocess(): one leading non-user turn is dropped
        turns = turns[1:]
    if not any(role == "user" for role, _ in turns):
        raise DataError(f"{where}: no user turn (a conversation starts with the user)")
    return turns


def _messages_turns(record: dict, where: str) -> tuple[str, list[tuple[str, str]]]:
    from ..react import ReActError, normalize_tools, parse_messages

    messages = record["messages"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    _check_tool_shapes(record, messages, where)
    for j, message in enumerate(messages):
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise DataError(f"{where}, messages[{j}]: \"content\" must be a string or a list of text parts, not "
                            f"{_json_type(content)}")
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
    except RecursionError:  # e.g. a tool's "parameters" schema nested hundreds deep
        raise DataError(f"{where}: nested too deeply to be fine-tuning data") from None
    turns = [(role, text) for query, reply in parsed.history for role, text in (("user", query), ("assistant", reply))]
    return parsed.system, turns


TOOL_FORM = '{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}'
CALL_FORM = '{"id": ..., "type": "function", "function": {"name": ..., "arguments": "{...}"}}'


def _json_type(value) -> str:
    """A value's type as the data file spells it."""
    names = {str: "a string", bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _check_tool_shapes(record: dict, messages: list[dict], where: str) -> None:
    """DataError for tools, functions or tool calls of the wrong JSON type (before qwen.react reads them)."""
    for key, form in (("tools", TOOL_FORM), ("functions", '{"name": ..., "description": ..., "parameters": {...}}')):
        value = record.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(item, dict) for item in value)):
            raise DataError(f"{where}: \"{key}\" must be a list of {form} objects, not {_json_type(value)}")
    for j, message in enumerate(messages):
        calls = message.get("tool_calls")
        if calls is not None and not (
            isinstance(calls, list) and all(isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls)
        ):
            raise DataError(f"{where}, messages[{j}]: \"tool_calls\" must be a list of {CALL_FORM} objects")
        call = message.get("function_call")
        if call is not None and not isinstance(call, dict):
            raise DataError(f"{where}, messages[{j}]: \"function_call\" must be an object "
                            '{"name": ..., "arguments": "{...}"}')


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


__all__ = ["IGNORE_INDEX", "DataReport", "SFTCollator", "Sample", "SupervisedDataset", "calibration_samples", "conversation", "encode_conversation", "load_conversations", "read_records"]
