"""Generate: routes the prompt or takes --path, samples reproducibly from a seed, stops at the
end of a document, and gives the same text as the exported model's own greedy decoding."""

import json

import pytest
import torch
from click.testing import CliRunner

from p2ptrain.cli import main
from p2ptrain.model.generate import Sampling, next_token, sample
from tests.unit.conftest import assert_one_line_error

transformers = pytest.importorskip("transformers", reason="these tests need p2ptrain[export]")






@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny run trained for 8 steps on two paths, and path 0,0 exported."""
    from conftest import TINY_RUN_TOML, write_topic_docs
    root = tmp_path_factory.mktemp("gen")
    run = root / "run.toml"
    run.write_text(TINY_RUN_TOML)
    data = write_topic_docs(root / "data")
    home = root / "home"
    runner = CliRunner()
    for path in ("0,0", "1,1"):
        r = runner.invoke(main, ["train", "--steps", "8", "--device", "cpu", "--json", "--home", str(home),
                                 "--run-config", str(run), "--data", str(data), "--path", path])
        assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["export", "--path", "0,0", "--out", str(root / "model"), "--home", str(home),
                             "--run-config", str(run), "--no-eval"])
    assert r.exit_code == 0, r.output
    return {"home": home, "run": run, "model": root / "model", "data": data}


def _gen(cli, exported, *args):
    result = cli("generate", *args, "--json", "--home", exported["home"], "--run-config", exported["run"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_greedy_generate_equals_the_exported_models_greedy_decoding(cli, exported):
    # Prepare: context is 16 tokens; EOS + 4 prompt bytes + 11 new ones fit, so no window slides
    prompt = "abc "

    # Execute
    ours = _gen(cli, exported, prompt, "--path", "0,0", "--temperature", 0, "--seed", 5, "--max-new-tokens", 11)
    tok = transformers.AutoTokenizer.from_pretrained(exported["model"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported["model"]).eval()
    ids = torch.tensor([[tok.eos_token_id, *tok(prompt, add_special_tokens=False).input_ids]])
    out = hf.generate(ids, max_new_tokens=11, do_sample=False, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    if out and out[-1] == tok.eos_token_id:
        out = out[:-1]

    # Assert
    assert ours["path"] == "0,0" and ours["how"] == "--path" and ours["round"] == 4
    assert ours["text"] == tok.decode(out)
    assert len(ours["text"]) > 0


def test_sampling_with_a_seed_gives_one_text_from_p2ptrain_and_from_the_export(cli, exported):
    # Execute
    args = ["abc", "--temperature", 0.9, "--top-k", 40, "--top-p", 0.95, "--seed", 11, "--max-new-tokens", 10]
    ours = _gen(cli, exported, *args, "--path", "0,0")
    again = _gen(cli, exported, *args, "--path", "0,0")
    other_seed = [_gen(cli, exported, *args[:-3], s, "--max-new-tokens", 10, "--path", "0,0")["text"]
                  for s in (12, 13, 14)]
    from_export = _gen(cli, exported, *args, "--model", exported["model"])

    # Assert
    assert ours["text"] == again["text"] == from_export["text"]
    assert from_export["path"] == "0,0" and "exported model" in from_export["how"]
    assert any(t != ours["text"] for t in other_seed)


def test_auto_routes_the_prompt_like_a_document_and_prints_the_path(cli, exported):
    # Prepare: a prompt in one topic's alphabet goes where that topic's documents go
    from conftest import topic_text
    from p2ptrain.config import RunConfig
    from p2ptrain.run_state import load_local_run_state
    state = load_local_run_state(exported["home"], RunConfig.load(exported["run"]))
    trained = {(0, 0), (1, 1)}
    prompt = next(t for t in (topic_text(k, 0, 200) for k in range(4))
                  if state.grid.paths()[int(state.router.route([t])[0])] in trained)
    expected = ",".join(map(str, state.grid.paths()[int(state.router.route([prompt])[0])]))

    # Execute
    result = cli("generate", prompt, "--seed", 1, "--max-new-tokens", 5, "--home", exported["home"],
                 "--run-config", exported["run"])

    # Assert
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(f"path {expected} (routed like a document, round 4)")
    assert result.stdout.startswith(prompt)


def test_generation_stops_at_the_end_of_a_document():
    # Prepare: a "model" that says "hi" and then ends the document
    script = [ord("h"), ord("i"), 256, ord("x")]

    def logits_fn(ids):
        out = torch.full((1, ids.shape[1], 257), -10.0)
        out[0, -1, script[min(ids.shape[1] - 1, len(script) - 1)]] = 10.0
        return out

    # Execute
    new, stopped = sample(logits_fn, [256], 256, 16, Sampling(max_new_tokens=50, temperature=0))

    # Assert
    assert new == [ord("h"), ord("i")] and stopped


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    # Prepare
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)

    # Execute
    top1 = {next_token(logits, Sampling(temperature=1.0, top_k=1), gen) for _ in range(50)}
    top2 = {next_token(logits, Sampling(temperature=1.0, top_k=2), gen) for _ in range(200)}
    nucleus = {next_token(logits, Sampling(temperature=1.0, top_p=0.8), gen) for _ in range(200)}
    everything = {next_token(logits, Sampling(temperature=1.0), gen) for _ in range(400)}

    # Assert
    assert top1 == {0} and top2 == {0, 1} and nucleus == {0, 1} and everything == {0, 1, 2, 3}


def test_generate_bad_input(cli, exported, tmp_path):
    common = ["--home", exported["home"], "--run-config", exported["run"]]
    assert_one_line_error(cli("generate", "x", "--path", "0,5", *common), 2, "path 0,5 is not in the grid [2, 2]")
    assert_one_line_error(cli("generate", "x", "--path", "0,1", *common), 5, "no checkpoint of path 0,1")
    assert_one_line_error(cli("generate", "x", "--home", tmp_path / "nothing", "--run-config", exported["run"]), 5,
                          "no run unit-cli in")
    assert_one_line_error(cli("generate", "x", "--model", tmp_path), 2, f"--model {tmp_path}: not an exported model")
