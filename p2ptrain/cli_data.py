"""`p2ptrain data add|list|show|remove|check`, `export` and `generate`: the contributor's
data under their control, and the trained model in users' hands.

Thin shells over p2ptrain.data.sources / ledger / redact and p2ptrain.model.export /
generate; registered in p2ptrain.cli.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from p2ptrain.cli_options import data_option, home_and_config, json_option, run_options
from p2ptrain.errors import UserError


def _run_state(home, config):
    from p2ptrain.run_state import load_local_run_state
    return load_local_run_state(home, config)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# ------------------------------------------------------------------- data

@click.group(name="data")
def data_group() -> None:
    """Your own documents: register folders, see what was used, remove them.

    Documents never leave this machine: they are read, redacted and tokenized here, and
    only the model's pseudo-gradients are averaged with peers.
    """


def source_options(f):
    f = click.option("--include", multiple=True, metavar="GLOB",
                     help="Read only files matching this pattern (repeatable; replaces the default "
                          "*.txt *.md *.py *.rst *.jsonl).")(f)
    f = click.option("--exclude", multiple=True, metavar="GLOB",
                     help="Skip files and folders matching this pattern (repeatable; hidden files and "
                          "folders are always skipped).")(f)
    f = click.option("--redact", default="all", show_default=True, metavar="KINDS",
                     help="What to redact before tokenization: all, none, or a comma list of "
                          "secret,email,card,ip,phone.")(f)
    f = click.option("--max-file-mb", default=16.0, show_default=True, type=click.FloatRange(0, min_open=True),
                     help="Skip files larger than this.")(f)
    return f


@data_group.command(name="add")
@click.argument("directory", type=click.Path())
@click.option("--name", default=None, help="Name of the source. [default: the folder's name]")
@source_options
@click.option("--home", default=None, type=click.Path(file_okay=False), help="Node home directory.")
@json_option
def data_add(directory, name, include, exclude, redact, max_file_mb, home, as_json) -> None:
    """Register DIRECTORY as a data source of this home (used from the next round on)."""
    from p2ptrain.config import RunConfig
    from p2ptrain.data.sources import SourceScanner, add_source, remove_source, source_dir
    from p2ptrain.errors import DataError
    from p2ptrain.home import resolve_home
    home = resolve_home(home)
    spec = add_source(home, directory, name, include, exclude, redact, max_file_mb)
    scanner = SourceScanner(spec, RunConfig.load().data.max_doc_chars)
    try:
        scan = scanner.scan()
    except DataError:
        remove_source(home, spec.name)
        raise
    scanner.save_index(source_dir(home, spec.name) / "index.json")
    from p2ptrain.data.ledger import Ledger
    Ledger(home).note_redactions(spec.name, scan.redactions)
    summary = scan.summary()
    if as_json:
        click.echo(json.dumps({"source": spec.__dict__, **summary}, indent=2))
        return
    click.echo(f"added source {spec.name!r}: {spec.path}")
    click.echo(f"  {summary['files']} files, {summary['documents']} documents, {summary['chars']:,} characters; "
               f"{summary['skipped']} skipped ({_reasons(summary)})")
    click.echo(f"  redactions: {_redactions(scan.redactions)}")
    click.echo("  `join` and `train` use it from their next round when no --data is given; "
               "see `p2ptrain data check` for every skipped file")


def _reasons(summary: dict) -> str:
    return ", ".join(f"{n} {r}" for r, n in sorted(summary["skipped_by_reason"].items())) or "none"


def _redactions(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


@data_group.command(name="list")
@run_options
@json_option
def data_list(home, run_config, as_json) -> None:
    """Each source: files, documents, routed tokens per path, what was trained, redactions."""
    from p2ptrain.data.corpus import BUILTIN_ORIGIN, DATA_DIRS_ORIGIN
    from p2ptrain.data.ledger import Ledger
    from p2ptrain.data.sources import SourceScanner, read_sources, route_files, source_dir
    from p2ptrain.errors import DataError
    home, config = home_and_config(home, run_config)
    state = _run_state(home, config)
    ledger = Ledger(home).totals()
    rows = []
    for spec in read_sources(home):
        scanner = SourceScanner(spec, config.data.max_doc_chars)
        index = source_dir(home, spec.name) / "index.json"
        scanner.load_index(index)
        row = {"name": spec.name, "path": spec.path, "registered": True, "include": spec.include,
               "exclude": spec.exclude, "redact": spec.redact}
        try:
            scan = scanner.scan(need_documents=False)
        except DataError as e:
            row["error"] = str(e)
            scan = None
        if scan is not None:
            routes: dict[str, int] = {}
            heldout = 0
            if state is not None:
                route_files(scanner, scan, state)
                for entry in scan.files.values():
                    for p, n in (entry.routes or {}).items():
                        routes[p] = routes.get(p, 0) + n
                    heldout += entry.heldout_tokens
            scanner.save_index(index)
            row.update(scan.summary())
            row["tokens_per_path"] = routes
            row["heldout_tokens"] = heldout
        row["trained"] = ledger["sources"].get(spec.name)
        rows.append(row)
    registered = {r["name"] for r in rows}
    for name, entry in sorted(ledger["sources"].items()):
        if name not in registered and entry["tokens"]:
            rows.append({"name": name, "registered": False, "trained": entry})
    if as_json:
        click.echo(json.dumps({"home": str(home), "run_id": config.run.id, "routed": state is not None,
                               "sources": rows}, indent=2))
        return
    if not registered:
        click.echo("no sources registered: training uses --data directories or the built-in corpus "
                   "(register one with p2ptrain data add DIR)")
    for row in rows:
        trained = row.get("trained") or {}
        label = {BUILTIN_ORIGIN: "the built-in corpus", DATA_DIRS_ORIGIN: "--data directories"}.get(row["name"])
        if not row["registered"]:
            state_text = label or ("removed at round " + str(trained.get("removed_at_round"))
                                   if not trained.get("open", True) else "not registered")
            click.echo(f"{row['name']}  ({state_text})")
        else:
            click.echo(f"{row['name']}  {row['path']}  (redact: {','.join(row['redact']) or 'none'})")
            if "error" in row:
                click.echo(f"  error: {row['error']}")
            else:
                click.echo(f"  {row['files']} files ({row['skipped']} skipped), {row['documents']} documents, "
                           f"{row['chars']:,} characters, {row['tokens']:,} tokens")
                per_path = row["tokens_per_path"]
                total = sum(per_path.values())
                if total:
                    click.echo("  training tokens per path: " + "  ".join(
                        f"{p} {n:,} ({_pct(n / total)})" for p, n in sorted(per_path.items()))
                        + f"  (held out: {row['heldout_tokens']:,})")
                elif state is None:
                    click.echo(f"  routing: no run state for run {config.run.id} in this home yet (train or join once)")
                click.echo(f"  redactions: {_redactions(row['redactions'])}")
        if trained.get("tokens"):
            click.echo(f"  trained: {trained['tokens']:,} tokens, {trained['documents']:,} documents, "
                       f"{trained['rounds']} rounds (rounds {trained['first_round']}-{trained['last_round']})")
        else:
            click.echo("  trained: nothing yet")


@data_group.command(name="show")
@click.argument("name")
@run_options
@click.option("--limit", default=50, show_default=True, type=click.IntRange(0), help="Files to list (0: all).")
@json_option
def data_show(name, home, run_config, limit, as_json) -> None:
    """Which files of source NAME were used, how much, and up to which round."""
    from p2ptrain.data.ledger import Ledger
    from p2ptrain.data.sources import get_source, read_sources
    home, _ = home_and_config(home, run_config)
    ledger = Ledger(home)
    spec = get_source(home, name)
    entry = ledger.source(name)
    if spec is None and entry is None:
        names = [s.name for s in read_sources(home)]
        raise UserError(f"no source named {name!r} in this home"
                        + (f"; registered: {', '.join(names)}" if names else " (none registered)"))
    usage = ledger.usage(name)
    files = sorted(usage["files"].items(), key=lambda kv: (-kv[1]["tokens"], kv[0]))
    root = spec.path if spec else None
    report = {"name": name, "registered": spec is not None, "path": root, "trained": entry,
              "files": [{"file": _relative(f, root), **v} for f, v in files]}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{name}: {'registered, ' + root if spec else 'no longer registered'}")
    if entry is None or not entry["tokens"]:
        click.echo("  nothing trained from it yet")
    else:
        click.echo(f"  {entry['tokens']:,} tokens from {entry['documents']:,} documents in {entry['rounds']} rounds "
                   f"(rounds {entry['first_round']}-{entry['last_round']})")
        for p, v in sorted(entry["paths"].items()):
            click.echo(f"  path {p}: {v['tokens']:,} tokens, rounds {v['first_round']}-{v['last_round']}")
        if not entry["open"]:
            click.echo(f"  removed: used up to round {entry['removed_at_round']}")
    if entry is not None:
        click.echo(f"  redactions: {_redactions(entry['redactions'])}")
    shown = files if limit == 0 else files[:limit]
    if shown:
        click.echo(f"  {'tokens':>12}  {'rounds':>11}  file")
        for f, v in shown:
            click.echo(f"  {v['tokens']:>12,}  {str(v['first_round']) + '-' + str(v['last_round']):>11}  "
                       f"{_relative(f, root)}")
        if len(files) > len(shown):
            click.echo(f"  ... and {len(files) - len(shown)} more files (--limit 0 lists all)")


def _relative(file: str, root: str | None) -> str:
    if root:
        try:
            return str(Path(file).relative_to(root))
        except ValueError:
            pass
    return file


@data_group.command(name="remove")
@click.argument("name")
@click.option("--home", default=None, type=click.Path(file_okay=False), help="Node home directory.")
@json_option
def data_remove(name, home, as_json) -> None:
    """Stop using source NAME from the next round (what was already trained stays in the model)."""
    from p2ptrain.data.ledger import Ledger
    from p2ptrain.data.sources import remove_source
    from p2ptrain.home import resolve_home
    home = resolve_home(home)
    spec = remove_source(home, name)
    ledger = Ledger(home)
    entry = ledger.source(name)
    last = entry["last_round"] if entry and entry["last_round"] is not None else 0
    ledger.close_source(name, last)
    entry = ledger.source(name)
    if as_json:
        click.echo(json.dumps({"removed": name, "path": spec.path, "trained": entry}, indent=2))
        return
    click.echo(f"removed source {name!r} ({spec.path}); its files are untouched")
    if entry["tokens"]:
        click.echo(f"used: {entry['tokens']:,} tokens from {entry['documents']:,} documents in rounds "
                   f"{entry['first_round']}-{entry['last_round']}; a node that is training stops reading it "
                   "at its next round boundary (the round in flight still counts)")
        click.echo("what stays: the modules trained on it (and averaged into the swarm's copies of them) keep "
                   "what they learned; that cannot be taken out of the model or recalled from peers. The "
                   "ledger keeps these numbers.")
    else:
        click.echo("it was never trained on: nothing of it is in the model")


@data_group.command(name="check")
@click.argument("directory", type=click.Path())
@source_options
@click.option("--run-config", "run_config", default=None, metavar="FILE|PRESET",
              help="Run config whose document size applies. [default: default]")
@json_option
def data_check(directory, include, exclude, redact, max_file_mb, run_config, as_json) -> None:
    """Dry run: what DIRECTORY would give as a source: read, skipped (and why), redacted."""
    from p2ptrain.config import RunConfig
    from p2ptrain.data.sources import check_directory
    config = RunConfig.load(run_config)
    scan = check_directory(directory, config.data.max_doc_chars, include, exclude, redact, max_file_mb)
    summary = scan.summary()
    files = [{"file": rel, "documents": e.documents, "chars": e.chars, "redactions": e.redactions,
              "bad_jsonl_lines": e.bad_lines} for rel, e in sorted(scan.files.items())]
    skipped = [{"file": rel, "reason": reason} for rel, reason in scan.skipped]
    if as_json:
        click.echo(json.dumps({**summary, "read": files, "skipped_files": skipped}, indent=2))
        return
    click.echo(f"{scan.root}: would read {summary['files']} files -> {summary['documents']} documents, "
               f"{summary['chars']:,} characters, {summary['tokens']:,} tokens")
    for f in files:
        red = f" (redacted: {_redactions(f['redactions'])})" if f["redactions"] else ""
        bad = f" ({f['bad_jsonl_lines']} bad .jsonl lines skipped)" if f["bad_jsonl_lines"] else ""
        click.echo(f"  read  {f['file']}{red}{bad}")
    for s in skipped:
        click.echo(f"  skip  {s['file']}: {s['reason']}")
    click.echo(f"redactions: {_redactions(scan.redactions)}")


# ----------------------------------------------------------------- export

@click.command(name="export")
@run_options
@data_option
@click.option("--path", "path_text", required=True, help="Path to export, e.g. 1,0.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write the model to.")
@click.option("--format", "fmt", default="hf", show_default=True, type=click.Choice(["hf"]),
              help="hf: a Hugging Face transformers model (GPT-NeoX), safetensors + tokenizer.json.")
@click.option("--checkpoints-from", "extra_homes", multiple=True, type=click.Path(file_okay=False),
              help="Also look for the path's checkpoints in these node homes (repeatable).")
@click.option("--no-eval", is_flag=True, help="Skip the held-out loss for the model card.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier export in --out.")
@json_option
def export(home, run_config, data, path_text, out, fmt, extra_homes, no_eval, overwrite, as_json) -> None:
    """Write one path (stem + its modules, newest verified checkpoint) as a standalone model."""
    import torch
    from p2ptrain.cli import _docs_loader
    from p2ptrain.data.tokenizer import load_tokenizer
    from p2ptrain.errors import CheckpointError
    from p2ptrain.model.export import export_model
    from p2ptrain.model.generate import path_model_from_checkpoint
    from p2ptrain.train.evaluate import _score, heldout_by_path
    home, config = home_and_config(home, run_config)
    state = _run_state(home, config)
    if state is None:
        raise CheckpointError(f"no run {config.run.id} in {home}: nothing trained here to export "
                              "(train or join first, or pass --home / --run-config)")
    path = state.grid.parse_path(path_text)
    homes = [home, *map(Path, extra_homes)]
    model, ckpt = path_model_from_checkpoint(state, homes, path, torch.device("cpu"))
    loss, count = None, 0
    if not no_eval:
        docs = _docs_loader(config, data, home)()
        tokenizer = load_tokenizer(config.data.tokenizer)
        sequences, budget = [], 32_768
        for doc in heldout_by_path(state, docs)[path]:
            if budget <= 0:
                break
            ids = (list(tokenizer.encode(doc.text)) + [tokenizer.eos_id])[: budget + 1]
            sequences.append(torch.tensor(ids, dtype=torch.long))
            budget -= len(ids) - 1
        total, count = _score(model, sequences, config.model.context, torch.device("cpu"))
        loss = total / count if count else None
    info = export_model(model, state, Path(out), round=ckpt.round, tokens=int(ckpt.meta.get("tokens", 0)),
                        heldout_loss=loss, heldout_tokens=count, checkpoint=str(ckpt.directory), overwrite=overwrite)
    result = {"out": str(info.out), "format": fmt, "path": info.path, "round": info.round, "modules": info.modules,
              "tokens": info.tokens, "heldout_loss": info.heldout_loss, "heldout_tokens": info.heldout_tokens,
              "checkpoint": str(ckpt.directory)}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    loss_text = f"held-out loss {loss:.3f} on {count:,} tokens" if loss is not None else "held-out loss not measured"
    click.echo(f"exported path {info.path} (round {info.round}, {', '.join(info.modules)}; {loss_text}) to {info.out}")
    click.echo(f"load it with transformers: AutoModelForCausalLM.from_pretrained({str(info.out)!r})")


# --------------------------------------------------------------- generate

@click.command(name="generate")
@click.argument("prompt", default="")
@run_options
@click.option("--path", "path_text", default="auto", show_default=True,
              help="Path to sample from, e.g. 1,0; auto routes the prompt like a document.")
@click.option("--model", "model_dir", default=None, type=click.Path(file_okay=False),
              help="Sample from an exported model directory instead of this home's checkpoints.")
@click.option("--max-new-tokens", default=200, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.8, show_default=True, type=click.FloatRange(0),
              help="0 decodes greedily.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0), help="0: off.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True), help="1: off.")
@click.option("--seed", default=None, type=int, help="Seed for sampling (same seed, same text).")
@click.option("--checkpoints-from", "extra_homes", multiple=True, type=click.Path(file_okay=False),
              help="Also look for path checkpoints in these node homes (repeatable).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@json_option
def generate(prompt, home, run_config, path_text, model_dir, max_new_tokens, temperature, top_k, top_p, seed,
             extra_homes, device, as_json) -> None:
    """Continue PROMPT with one path of the model; prints the path it used on stderr."""
    from p2ptrain.data.tokenizer import load_tokenizer
    from p2ptrain.errors import CheckpointError
    from p2ptrain.model.generate import (Sampling, document_prompt, hf_model_logits, path_model_from_checkpoint,
                                         path_model_logits, route_prompt, sample)
    from p2ptrain.model.grid import path_name
    from p2ptrain.train.inner import resolve_device
    s = Sampling(max_new_tokens, temperature, top_k, top_p, seed)
    s.check()
    if model_dir is not None:
        if path_text != "auto":
            raise UserError("--path and --model exclude each other: an exported model is one path already")
        logits_fn, tokenizer, provenance = hf_model_logits(Path(model_dir))
        eos_id = tokenizer.eos_token_id
        ids = [eos_id, *tokenizer(prompt, add_special_tokens=False).input_ids]
        context = int(provenance.get("run_config", {}).get("model", {}).get("context", 0)) or \
            tokenizer.model_max_length
        new, stopped = sample(logits_fn, ids, eos_id, context, s)
        text = tokenizer.decode(new)
        used = {"path": ",".join(map(str, provenance.get("path", []))) or "?", "how": f"exported model {model_dir}",
                "round": provenance.get("round")}
    else:
        home, config = home_and_config(home, run_config)
        state = _run_state(home, config)
        if state is None:
            raise CheckpointError(f"no run {config.run.id} in {home}: train or join first (or pass --home / "
                                  "--run-config, or --model DIR for an exported model)")
        if path_text == "auto":
            path, how = route_prompt(state, prompt), "routed like a document"
        else:
            path, how = state.grid.parse_path(path_text), "--path"
        model, ckpt = path_model_from_checkpoint(state, [home, *map(Path, extra_homes)], path, resolve_device(device))
        tokenizer = load_tokenizer(config.data.tokenizer)
        new, stopped = sample(path_model_logits(model), document_prompt(tokenizer, prompt), tokenizer.eos_id,
                              config.model.context, s)
        text = tokenizer.decode(new)
        used = {"path": path_name(path), "how": how, "round": ckpt.round}
    if as_json:
        click.echo(json.dumps({"prompt": prompt, "text": text, "tokens": len(new), "stopped_at_end": stopped, **used,
                               "seed": seed, "temperature": temperature, "top_k": top_k, "top_p": top_p}))
        return
    click.echo(f"path {used['path']} ({used['how']}, round {used['round']})", err=True)
    click.echo(prompt + text)
    if stopped:
        click.echo("[end of document]", err=True)
    sys.stdout.flush()
