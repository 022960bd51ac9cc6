"""`python -m qwen.convert to-qwen2`: transformers' own Qwen2ForCausalLM on the export computes what QWen computes."""

import json

import pytest
import torch
from conftest import load_reference
from transformers import AutoTokenizer, Qwen2ForCausalLM

from qwen.checkpoints import make_tiny_checkpoint
from qwen.configuration_qwen import QWenConfig
from qwen.convert import main
from qwen.errors import UsageError
from qwen.export import export_qwen2, long_context_rope, ntk_long_factor
from qwen.modeling_qwen import QWenLMHeadModel, dynamic_ntk_alpha
from qwen_generation_utils import DEFAULT_SYSTEM, IM_START, make_context

SEQ_LENGTH = 16  # the tiny checkpoint's training context; its max_position_embeddings is 4x that
TINY = {"layers": 2, "hidden": 64, "heads": 4, "intermediate": 256, "seq_length": SEQ_LENGTH}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qwen"), **TINY)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2")
    assert main(["to-qwen2", str(tiny), str(out)]) == 0
    return out


def _models(tiny, exported, **overrides):
    ours = QWenLMHeadModel.from_pretrained(tiny, dtype=torch.float32, **overrides).eval()
    theirs = Qwen2ForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    return ours, theirs


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
def test_same_logits_and_greedy_ids_up_to_seq_length(tiny, exported):
    ours, theirs = _models(tiny, exported)
    ids = torch.randint(0, 151643, (2, SEQ_LENGTH), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_logits(ours, ids), _logits(theirs, ids), atol=1e-4, rtol=0)

    prompt = ids[:1, :6]
    new = SEQ_LENGTH - 6
    settings = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "eos_token_id": 151643}
    ours_ids = ours.generate(prompt, **settings)
    theirs_ids = theirs.generate(prompt, **settings)
    assert ours_ids.shape[1] == SEQ_LENGTH
    assert ours_ids.tolist() == theirs_ids.tolist()


def test_past_seq_length_ntk_matches_and_logn_is_what_differs(tiny, exported):
    config = json.loads((exported / "config.json").read_text())
    rope = config["rope_parameters"]
    assert rope["rope_type"] == "longrope" and rope["original_max_position_embeddings"] == SEQ_LENGTH
    alpha = dynamic_ntk_alpha(config["max_position_embeddings"], SEQ_LENGTH)
    assert alpha == 7 and rope["long_factor"] == ntk_long_factor(alpha, TINY["hidden"] // TINY["heads"])
    assert rope["short_factor"] == [1.0] * 8

    # 3x seq_length: QWen uses alpha 7 there, as the export's long factors do; without logN they agree.
    ids = torch.randint(0, 151643, (1, 3 * SEQ_LENGTH), generator=torch.Generator().manual_seed(1))
    ours, theirs = _models(tiny, exported, use_logn_attn=False)
    assert torch.allclose(_logits(ours, ids), _logits(theirs, ids), atol=1e-4, rtol=0)
    # with logN (the checkpoint's setting) the positions past seq_length differ; those before do not (logN
    # scales only queries past seq_length, and both sides use alpha 7 for the whole sequence)
    ours_logn = QWenLMHeadModel.from_pretrained(tiny, dtype=torch.float32).eval()
    gap = (_logits(ours_logn, ids) - _logits(theirs, ids)).abs().amax(dim=-1)[0]
    assert gap[:SEQ_LENGTH].max() <= 1e-4
    assert gap[SEQ_LENGTH:].min() > 1e-4


def test_rope_none_and_short_max_positions_stay_plain(tiny):
    config = QWenConfig.from_pretrained(tiny)
    for mode, max_positions in (("none", 4 * SEQ_LENGTH), ("longrope", SEQ_LENGTH)):
        rope = long_context_rope(config, max_positions, mode)
        assert rope == {"rope_type": "default", "rope_theta": 10000.0}
    with pytest.raises(UsageError):
        long_context_rope(config, 4 * SEQ_LENGTH, "yarn")


@pytest.fixture(scope="module")
def fast_tokenizer(exported):
    return AutoTokenizer.from_pretrained(exported)


def test_tokenizer_gives_the_original_ids(fast_tokenizer):
    golden = load_reference("tokenizer_golden.json")
    assert golden["encode"]
    for case in golden["encode"]:
        text = case["text"]
        assert fast_tokenizer.encode(text, add_special_tokens=False) == case["ids_default"], text
        plain = fast_tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert plain == case["ids_no_special"], text
    for case in golden["decode"]:
        skip = case.get("skip_special_tokens", False)
        assert fast_tokenizer.decode(case["ids"], skip_special_tokens=skip) == case["decode"]
    for token, index in golden["meta"]["special"].items():
        assert fast_tokenizer.convert_tokens_to_ids(token) == index


def test_tokenizer_agrees_with_qwen_tokenizer_where_the_golden_file_is_silent(tiny, exported, fast_tokenizer):
    from tokenizers import Tokenizer

    qwen_tokenizer = AutoTokenizer.from_pretrained(tiny)
    raw = Tokenizer.from_file(str(exported / "tokenizer.json"))  # as engines that read tokenizer.json directly
    texts = ["Cafe\u0301 de\u0301ja\u0300 vu", "\u212b\u2126 \uff21\uff22", "12345678 3.14159", "a\r\n\r\n  b\t\tc",
             "don't I'LL we've", "<|extra_7|>x<|endoftext|>", "😀👍🏽 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]  # fmt: skip
    for text in texts:  # NFC-composable accents, compatibility characters, digits, CRLF, contractions, emoji
        expected = qwen_tokenizer.encode(text)
        assert fast_tokenizer.encode(text, add_special_tokens=False) == expected, text
        assert raw.encode(text, add_special_tokens=False).ids == expected, text


def _messages(case) -> list[dict]:
    messages = [{"role": "system", "content": case["system"]}]
    for query, response in case["history"]:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
    return messages + [{"role": "user", "content": case["query"]}]


def test_chat_template_renders_make_context(fast_tokenizer):
    cases = load_reference("tokenizer_golden.json")["make_context"]
    assert cases
    checked = 0
    for case in cases:
        if case["raw_text"].count(IM_START) != 3 + 2 * len(case["history"]):
            continue  # max_window_size dropped old turns: the engine's template does not trim (its context limit does)
        checked += 1
        text = fast_tokenizer.apply_chat_template(_messages(case), add_generation_prompt=True, tokenize=False)
        assert text == case["raw_text"]
        ids = fast_tokenizer.apply_chat_template(_messages(case), add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert list(ids) == case["tokens"]
    assert checked
    # no system message: the default one, as make_context's callers use
    default = fast_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                 tokenize=False)
    assert default == make_context(fast_tokenizer, "hi", system=DEFAULT_SYSTEM)[0]


def test_generation_config_stops_at_chatml_tokens(exported):
    generation = json.loads((exported / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == {151643, 151644, 151645}
    assert generation["pad_token_id"] == 151643
    assert "chat_format" not in generation and "top_k" not in generation  # QWen-only keys / 0 = "off" dropped


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["to-qwen2", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "llama" / "model.safetensors").write_bytes(b"")
    assert main(["to-qwen2", str(tmp_path / "llama"), str(tmp_path / "out")]) == 2
    assert "not a QWen (v1) checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_model_export_keeps_its_tokenizer_and_greedy_answer(demo_checkpoint, tmp_path):
    export_qwen2(demo_checkpoint, tmp_path)
    ours = QWenLMHeadModel.from_pretrained(demo_checkpoint, dtype=torch.float32).eval()
    theirs = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    source_tokenizer = AutoTokenizer.from_pretrained(demo_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    _, prompt = make_context(source_tokenizer, "What is the capital of France?", system=DEFAULT_SYSTEM)
    assert tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        tokenize=True, return_dict=True,
    )["input_ids"] == prompt
    ids = torch.tensor([prompt])
    settings = {"max_new_tokens": 12, "do_sample": False}
    assert ours.generate(ids, **settings).tolist() == theirs.generate(ids, **settings).tolist()


# ---- GPTQ (auto-gptq v1 layout, as the hub's Qwen-*-Int4 / -Int8) ----


def _unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> their 32 // bits values (lowest bits first), laid out along `dim`."""
    shifts = torch.arange(0, 32, bits)
    values = (packed.long().unsqueeze(dim + 1) >> shifts.view(*([1] * (dim + 1)), -1, *([1] * (1 - dim)))) & (
        (1 << bits) - 1
    )
    return values.flatten(dim, dim + 1)


def _dequantize(tensors: dict, prefix: str, bits: int) -> torch.Tensor:
    """weight [out, in] = scale * (q - (zero + 1)) per (group of input columns, output column)."""
    q = _unpack(tensors[f"{prefix}.qweight"], bits, dim=0)  # [in, out]
    zeros = _unpack(tensors[f"{prefix}.qzeros"], bits, dim=1) + 1  # [groups, out]
    groups = tensors[f"{prefix}.g_idx"].long()
    return (tensors[f"{prefix}.scales"].float()[groups] * (q - zeros[groups]).float()).T


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_checkpoint_exports_packed_q_k_v(tiny, tmp_path, bits):
    from safetensors.torch import load_file, save_file

    source = tmp_path / "gptq"
    source.mkdir()
    config = json.loads((tiny / "config.json").read_text())
    quantization = {"quant_method": "gptq", "bits": bits, "group_size": 32, "desc_act": False, "sym": True}
    config["quantization_config"] = quantization
    (source / "config.json").write_text(json.dumps(config))
    for name in ("generation_config.json", "tokenizer_config.json", "qwen.tiktoken"):
        (source / name).write_bytes((tiny / name).read_bytes())
    (source / "quantize_config.json").write_text(json.dumps(quantization))
    generator = torch.Generator().manual_seed(0)
    words = lambda *shape: torch.randint(-(2**31), 2**31 - 1, shape, generator=generator, dtype=torch.int64).int()  # noqa: E731
    hidden, ffn, per_word = TINY["hidden"], TINY["intermediate"] // 2, 32 // bits
    linears = {"attn.c_attn": (hidden, 3 * hidden), "attn.c_proj": (hidden, hidden), "mlp.w1": (hidden, ffn),
               "mlp.w2": (hidden, ffn), "mlp.c_proj": (ffn, hidden)}  # fmt: skip
    base = {name: t for shard in sorted(tiny.glob("model-*.safetensors")) for name, t in load_file(shard).items()}
    tensors = {name: t.half() for name, t in base.items() if not any(f".{linear}." in name for linear in linears)}
    for layer in range(TINY["layers"]):
        for linear, (columns_in, columns_out) in linears.items():
            prefix = f"transformer.h.{layer}.{linear}"
            tensors[f"{prefix}.qweight"] = words(columns_in // per_word, columns_out)
            tensors[f"{prefix}.qzeros"] = words(columns_in // 32, columns_out // per_word)
            tensors[f"{prefix}.scales"] = torch.rand(columns_in // 32, columns_out, generator=generator).half()
            tensors[f"{prefix}.g_idx"] = torch.arange(columns_in, dtype=torch.int32) // 32
        tensors[f"transformer.h.{layer}.attn.c_attn.bias"] = torch.randn(3 * hidden, generator=generator).half()
    save_file(tensors, source / "model.safetensors")

    out = export_qwen2(source, tmp_path / "qwen2")
    exported = load_file(out / "model.safetensors")
    qwen2_config = json.loads((out / "config.json").read_text())
    assert qwen2_config["quantization_config"] == quantization
    assert json.loads((out / "quantize_config.json").read_text()) == quantization
    for layer in range(TINY["layers"]):
        fused = _dequantize(tensors, f"transformer.h.{layer}.attn.c_attn", bits)
        split = [_dequantize(exported, f"model.layers.{layer}.self_attn.{p}_proj", bits) for p in "qkv"]
        assert torch.equal(torch.cat(split), fused)
        bias = torch.cat([exported[f"model.layers.{layer}.self_attn.{p}_proj.bias"] for p in "qkv"])
        assert torch.equal(bias, tensors[f"transformer.h.{layer}.attn.c_attn.bias"])
        for qwen_name, qwen2_name in (("mlp.w2", "mlp.gate_proj"), ("mlp.w1", "mlp.up_proj"),
                                      ("mlp.c_proj", "mlp.down_proj"), ("attn.c_proj", "self_attn.o_proj")):  # fmt: skip
            for part in ("qweight", "qzeros", "scales", "g_idx"):
                assert torch.equal(exported[f"model.layers.{layer}.{qwen2_name}.{part}"],
                                   tensors[f"transformer.h.{layer}.{qwen_name}.{part}"])  # fmt: skip
    assert exported["model.norm.weight"].dtype == torch.float16
