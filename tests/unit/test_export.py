"""Export: a path loads in transformers with no custom code, with p2ptrain's logits (<= 1e-4)
and p2ptrain's tokens; the model card says what it is; bad input is one error line."""

import json

import pytest
import torch

from p2ptrain.config import RunConfig
from p2ptrain.data.tokenizer import ByteTokenizer, HFTokenizer
from p2ptrain.model.export import export_model
from p2ptrain.run_state import RunState
from p2ptrain.train.session import build_model
from tests.unit.conftest import assert_one_line_error

transformers = pytest.importorskip("transformers", reason="export tests need p2ptrain[export]")

TEXT = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # é ü 😀 中文\n"






def _perturbed_model(state, path, seed=0):
    """A path model whose every parameter (norm gains and biases too) is far from its init,
    so a wrong mapping cannot hide behind ones and zeros."""
    model = build_model(state, path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.mark.parametrize("tied,levels,blocks", [(True, [2, 2], 1), (False, [3, 1, 2], 2)])
def test_exported_logits_equal_p2ptrains(tmp_path, stdlib_docs, tied, levels, blocks):
    # Prepare: 4 heads of 16 dims, so the per-head RoPE permutation matters
    config = RunConfig.from_dict({"run": {"id": "unit-export"}, "model": {"d_model": 64, "n_heads": 4, "context": 64,
                                                                          "tie_embeddings": tied},
                                  "grid": {"levels": levels, "blocks_per_level": blocks},
                                  "router": {"kmeans_iters": 3}})
    state = RunState.create(config, stdlib_docs[:200])
    path = tuple(k - 1 for k in levels)
    model = _perturbed_model(state, path)

    # Execute
    export_model(model, state, tmp_path / "out", round=7, tokens=1234)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor(ByteTokenizer().encode(TEXT)[:64], dtype=torch.long)[None]
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(ids).logits

    # Assert
    assert type(hf).__name__ == "GPTNeoXForCausalLM"
    assert theirs.dtype == torch.float32 and theirs.shape == ours.shape
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-4, diff
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "p2ptrain.json",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert not list((tmp_path / "out").glob("*.py"))  # no custom code


def test_exported_tokenizer_gives_p2ptrains_token_ids(tmp_path, tiny_run_state):
    # Prepare
    export_model(build_model(tiny_run_state, (0, 0)), tiny_run_state, tmp_path / "out", round=1, tokens=0)

    # Execute
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tok(TEXT, add_special_tokens=False).input_ids

    # Assert
    assert ids == ByteTokenizer().encode(TEXT).tolist()
    assert tok.decode(ids) == TEXT
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 256 and len(tok) == 257


def test_a_run_with_its_own_tokenizer_exports_it(tmp_path, stdlib_docs):
    # Prepare: a small BPE trained here, as a run's data.tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([d.text for d in stdlib_docs[:50]], trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(tmp_path / "bpe.json"))
    config = RunConfig.from_dict({"run": {"id": "unit-bpe"}, "model": {"d_model": 32, "n_heads": 2, "context": 32},
                                  "grid": {"levels": [2], "blocks_per_level": 1}, "router": {"kmeans_iters": 2},
                                  "data": {"tokenizer": str(tmp_path / "bpe.json")}})
    state = RunState.create(config, stdlib_docs[:100])
    model = _perturbed_model(state, (1,))

    # Execute
    export_model(model, state, tmp_path / "out", round=1, tokens=0)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ours_tok = HFTokenizer(tmp_path / "bpe.json")
    ids = tok(TEXT, add_special_tokens=False).input_ids

    # Assert
    assert ids == ours_tok.encode(TEXT).tolist()
    assert tok.eos_token_id == ours_tok.eos_id == 400
    x = torch.tensor(ids[:32])[None]
    with torch.no_grad():
        assert (model(x)[0] - hf(x).logits).abs().max().item() <= 1e-4


@pytest.fixture
def trained_home(cli, tmp_path, tiny_run_toml, topic_data_dir):
    home = tmp_path / "home"
    result = cli("train", "--steps", 4, "--device", "cpu", "--json", "--home", home, "--run-config", tiny_run_toml,
                 "--data", topic_data_dir, "--path", "1,1")
    assert result.exit_code == 0, result.output
    return home


def test_cli_export_writes_a_model_card_and_loads(cli, tmp_path, trained_home, tiny_run_toml, topic_data_dir):
    # Execute
    result = cli("export", "--path", "1,1", "--out", tmp_path / "model", "--home", trained_home, "--run-config",
                 tiny_run_toml, "--data", topic_data_dir, "--json")

    # Assert
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["path"], info["round"], info["modules"]) == ("1,1", 2, ["stem", "L0.M1", "L1.M1"])
    assert info["tokens"] == 4 * 4 * 16 and info["heldout_loss"] > 0 and info["heldout_tokens"] > 0
    card = (tmp_path / "model" / "README.md").read_text()
    for fact in ("unit-cli", "| round | 2 |", "| path | 1,1 of grid [2, 2] |", "`stem`, `L0.M1`, `L1.M1`",
                 f"{info['tokens']:,}", f"{info['heldout_loss']:.4f} nats/token", "## Router", "3-grams"):
        assert fact in card, fact
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert hf.config.num_hidden_layers == 2 and hf.config.vocab_size == 257
    again = cli("export", "--path", "1,1", "--out", tmp_path / "model", "--home", trained_home, "--run-config",
                tiny_run_toml, "--no-eval")
    assert_one_line_error(again, 2, f"--out {tmp_path / 'model'} exists and is not empty")
    replaced = cli("export", "--path", "1,1", "--out", tmp_path / "model", "--home", trained_home, "--run-config",
                   tiny_run_toml, "--no-eval", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert "not measured" in (tmp_path / "model" / "README.md").read_text()


def test_cli_export_bad_input(cli, tmp_path, trained_home, tiny_run_toml):
    common = ["--home", trained_home, "--run-config", tiny_run_toml, "--no-eval"]
    assert_one_line_error(cli("export", "--path", "0,1", "--out", tmp_path / "m", *common), 5,
                          "no checkpoint of path 0,1")
    assert_one_line_error(cli("export", "--path", "2,0", "--out", tmp_path / "m", *common), 2,
                          "path 2,0 is not in the grid [2, 2]")
    assert_one_line_error(cli("export", "--path", "1,1", "--out", tmp_path / "m", "--home", tmp_path / "empty",
                              "--run-config", tiny_run_toml), 5, "no run unit-cli in")
