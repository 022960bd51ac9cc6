"""Each eval script decodes as its original: the checkpoint's generation_config with the script's overrides on top.

The chat scripts set do_sample=False and repetition_penalty=1.0; evaluate_gsm8k / humaneval / plugin.py set only
do_sample=False, so a checkpoint's repetition_penalty (1.1 in the -Chat configs) stays on. Checked on a copy of the
demo checkpoint whose generation_config says repetition_penalty 1.1, against transformers' own generate().
"""

import json

import pytest
import torch
from conftest import REFERENCE, REPO

from qwen.evaluation import extract, prompts
from qwen.evaluation.runner import main

FIXTURES = REFERENCE / "eval"


@pytest.fixture(scope="module")
def penalized_checkpoint(demo_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("penalized")
    for item in demo_checkpoint.iterdir():
        if item.name != "generation_config.json":
            (folder / item.name).symlink_to(item)
    config = json.loads((demo_checkpoint / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 1.1}))
    return folder


def run(name, checkpoint, tmp_path, *flags):
    out = tmp_path / f"{name}_res.jsonl"
    summary = main(name, ["-c", str(checkpoint), "-o", str(out), *map(str, flags)], eval_dir=REPO / "eval")
    return summary, [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def hf_greedy(checkpoint, prompt: str, max_new_tokens: int, repetition_penalty: float) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(ids, do_sample=False, repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens,
                         attention_mask=torch.ones_like(ids))
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_base_gsm8k_keeps_the_checkpoints_repetition_penalty(penalized_checkpoint, tmp_path):
    flags = ("-f", FIXTURES / "gsm8k" / "test.jsonl", "--limit", 1, "--max-new-tokens", 40)
    summary, [record] = run("gsm8k", penalized_checkpoint, tmp_path, *flags)
    assert summary["decoding"] == {"greedy": True, "repetition_penalty": 1.1}
    few_shot = (REPO / "eval" / "gsm8k_prompt.txt").read_text(encoding="utf-8")
    prompt = prompts.gsm8k_prompt(few_shot, record["question"])
    penalized = extract.cut_at_stop(hf_greedy(penalized_checkpoint, prompt, 40, 1.1), prompts.GSM8K_STOPS)
    plain = extract.cut_at_stop(hf_greedy(penalized_checkpoint, prompt, 40, 1.0), prompts.GSM8K_STOPS)
    assert penalized != plain  # the penalty matters on this prompt, so the comparison below means something
    assert record["completion"] == penalized


def test_chat_scripts_turn_the_penalty_off(penalized_checkpoint, tmp_path):
    summary, _ = run("chat_gsm8k", penalized_checkpoint, tmp_path, "-f", FIXTURES / "gsm8k", "--limit", 1,
                     "--max-new-tokens", 4)
    assert summary["decoding"] == {"greedy": True, "repetition_penalty": 1.0}
    summary, _ = run("ceval", penalized_checkpoint, tmp_path, "-d", FIXTURES / "ceval", "--limit", 1)
    assert summary["decoding"] is None  # scored by probabilities, nothing generated
