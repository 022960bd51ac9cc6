"""The tiny-checkpoint maker writes the hub's on-disk layout, deterministically."""

import hashlib
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from qwen.checkpoints import HUB_AUTO_MAP, HUB_GENERATION_CONFIG, HUB_VOCAB_SIZE, make_tiny_checkpoint
from qwen.convert import main

TINY = {"hidden": 32, "heads": 4, "layers": 2, "intermediate": 64}


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("sharded"), **TINY)


def test_sharded_layout_matches_the_hub(sharded):
    index = _read(sharded / "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1, "2MB shards of a 151936-token embedding must give several files"
    assert {p.name for p in sharded.glob("model-*.safetensors")} == set(shards)
    names = set(index["weight_map"])
    for layer in range(TINY["layers"]):
        for part in (
            "ln_1.weight",
            "attn.c_attn.weight",
            "attn.c_attn.bias",
            "attn.c_proj.weight",
            "ln_2.weight",
            "mlp.w1.weight",
            "mlp.w2.weight",
            "mlp.c_proj.weight",
        ):
            assert f"transformer.h.{layer}.{part}" in names
    assert {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"} <= names
    assert not (sharded / "model.safetensors").exists()

    # every tensor lives in the shard the index names, in bf16 as on the hub
    total = 0
    for shard in shards:
        with safe_open(sharded / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                assert index["weight_map"][name] == shard
                tensor = f.get_tensor(name)
                assert str(tensor.dtype) == "torch.bfloat16"
                total += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == total
    with safe_open(sharded / index["weight_map"]["transformer.wte.weight"], "pt") as f:
        assert f.get_slice("transformer.wte.weight").get_shape() == [HUB_VOCAB_SIZE, TINY["hidden"]]


def test_config_files_carry_the_hub_auto_maps(sharded):
    config = _read(sharded / "config.json")
    assert config["auto_map"] == HUB_AUTO_MAP
    assert config["architectures"] == ["QWenLMHeadModel"]
    assert config["model_type"] == "qwen"
    assert config["vocab_size"] == HUB_VOCAB_SIZE
    assert (config["hidden_size"], config["num_hidden_layers"], config["kv_channels"]) == (32, 2, 8)

    tokenizer_config = _read(sharded / "tokenizer_config.json")
    assert tokenizer_config["auto_map"] == {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}
    assert tokenizer_config["tokenizer_class"] == "QWenTokenizer"
    assert (sharded / "qwen.tiktoken").stat().st_size > 2_000_000  # the real vocabulary, copied

    generation = _read(sharded / "generation_config.json")
    assert generation == HUB_GENERATION_CONFIG
    assert generation["chat_format"] == "chatml" and generation["max_window_size"] == 6144
    assert generation["eos_token_id"] == generation["pad_token_id"] == 151643


def test_base_model_has_raw_chat_format(tmp_path):
    out = make_tiny_checkpoint(tmp_path, **TINY, chat=False, format="single")
    generation = _read(out / "generation_config.json")
    assert generation["chat_format"] == "raw" and generation["max_window_size"] == 6144
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()


def test_bin_format_uses_the_aug_2023_config_keys(tmp_path):
    out = make_tiny_checkpoint(tmp_path, **TINY, format="bin")
    config = _read(out / "config.json")
    legacy = {
        "n_embd": 32,
        "n_head": 4,
        "n_layer": 2,
        "ffn_hidden_size": 64,
        "padded_vocab_size": HUB_VOCAB_SIZE,
    }
    assert {key: config.get(key) for key in legacy} == legacy
    for final_name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size"):
        assert final_name not in config
    assert "n_positions" in config and "max_position_embeddings" not in config
    assert (out / "pytorch_model.bin.index.json").is_file()
    assert list(out.glob("pytorch_model-*.bin")) and not list(out.glob("*.safetensors"))


def test_same_options_give_identical_files_and_the_seed_matters(tmp_path):
    first = _digests(make_tiny_checkpoint(tmp_path / "a", **TINY, seed=3))
    second = _digests(make_tiny_checkpoint(tmp_path / "b", **TINY, seed=3))
    other_seed = _digests(make_tiny_checkpoint(tmp_path / "c", **TINY, seed=4))
    assert first == second
    weights = [name for name in first if name.startswith("model-")]
    assert weights and all(first[name] != other_seed[name] for name in weights)
    assert first["config.json"] == other_seed["config.json"]


def test_cli_tiny_command(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(
        [
            "tiny",
            str(out),
            "--hidden",
            "32",
            "--heads",
            "4",
            "--intermediate",
            "64",
            "--base",
            "--format",
            "single",
            "--seq-length",
            "512",
        ]
    )
    assert code == 0
    assert str(out) in capsys.readouterr().out
    assert _read(out / "config.json")["seq_length"] == 512
    assert _read(out / "generation_config.json")["chat_format"] == "raw"


def test_cli_rejects_bad_sizes(tmp_path, capsys):
    assert main(["tiny", str(tmp_path / "bad"), "--hidden", "30", "--heads", "4"]) == 2
    assert "multiple of heads" in capsys.readouterr().err


def test_convert_llama_given_a_qwen_checkpoint_says_so(tmp_path, capsys):
    source = make_tiny_checkpoint(tmp_path / "tiny")
    assert main(["llama", str(source), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "already a QWen checkpoint" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
