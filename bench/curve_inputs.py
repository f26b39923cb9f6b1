"""What every learning-curve run shares (``curves.py``, ``block_methods.py``): the model, the data split into
clients, a validation and a test split, and the schedule nearest a token budget. Each is made once under the
benchmark's output folder and reused by every run."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def prepare(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(model directory, split directory with client-<i>/ and eval/ = validation, test directory)."""
    from fedcybgd.cli.partition import partition_corpus, shakespeare_texts
    from fedcybgd.common.tiny import TINY_TEXT, write_tiny_model_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    if not (model_dir / "config.json").is_file():
        if args.model == "tiny":
            write_tiny_model_dir(model_dir, seed=0)
        else:
            _shallow_model(args.model, args.layers, model_dir)
    split, test = out / "split", out / "test"
    if not split.is_dir():
        corpus = Path(args.corpus) if args.corpus and args.corpus != "mmlu-cot" else None
        if corpus is None and args.model == "tiny":
            corpus = out / "corpus"
            corpus.mkdir(exist_ok=True)
            for i, sonnet in enumerate(t.strip() for t in TINY_TEXT.split("\n\n") if t.strip()):
                (corpus / f"sonnet-{i:03d}.txt").write_text(sonnet + "\n")
        by_column = None
        if args.corpus == "mmlu-cot":
            corpus, by_column = mmlu_cot_corpus(out / "corpus"), "subject"
        partition_corpus(corpus or shakespeare_texts(), split, args.clients, "by-document", eval_fraction=0.2, seed=0,
                         by_column=by_column)
        _halve(split / "eval", test)
    return model_dir, split, test


def mmlu_cot_corpus(out: Path) -> Path:
    """Instruction records from a PyPI package: the chain-of-thought exemplars of MMLU's 57 subjects that lm-eval
    ships (``pip install --no-deps lm_eval==0.4.13``; 282 questions, each answered step by step), as JSON lines of
    instruction / output with the subject, the natural key clients are split by (non-IID: each site its subjects)."""
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the mmlu-cot corpus needs lm-eval's files: pip install --no-deps lm_eval==0.4.13")
    source = Path(next(iter(spec.submodule_search_locations))) / "tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"
    records = []
    for subject, text in json.loads(source.read_text()).items():
        header, _, body = text.partition("\n\n")
        for exemplar in body.split("\n\nQ: "):
            question, found, answer = exemplar.removeprefix("Q: ").partition("\nA: ")
            if found:
                records.append({"instruction": f"{header}\n\n{question.strip()}", "output": answer.strip(),
                                "subject": subject})
    out.mkdir(parents=True, exist_ok=True)
    path = out / "mmlu_cot.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _shallow_model(source: str, layers: int, out: Path) -> None:
    """The first ``layers`` decoder layers of the model (``smollm2``: the packaged SmolLM2-135M-Instruct, bf16)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == "smollm2":
        from fedcybgd.cli.prepare import packaged_smollm2, prepare_model

        source = str(prepare_model(packaged_smollm2(), Path.home() / ".cache/fedcybgd/models/"
                                   "smollm2-135m-instruct-bfloat16", "bfloat16"))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    if layers:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:layers]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)


def _halve(eval_dir: Path, test: Path) -> None:
    """Move every other held-out file (text corpora) or record (record data) from ``eval_dir`` to ``test``."""
    test.mkdir(parents=True, exist_ok=True)
    records = eval_dir / "data.jsonl"
    if records.is_file():
        lines = records.read_text().splitlines(keepends=True)
        records.write_text("".join(lines[0::2]))
        (test / "data.jsonl").write_text("".join(lines[1::2]))
        return
    for f in sorted(eval_dir.iterdir())[1::2]:
        f.rename(test / f.name)


def nearest_schedule(specs, visits: int, **settings):
    """The coordinator's schedule over ``specs`` (``settings``: the other ScheduleConfig fields) whose number of
    rounds comes nearest to ``visits`` (on a tie, the longer)."""
    from fedcybgd.server.scheduler import CycleSchedule, ScheduleConfig

    best = None
    for k in range(1, visits + 1):
        schedule = CycleSchedule.for_blocks(specs, ScheduleConfig(cycles=k, **settings))
        if best is None or abs(schedule.total_rounds - visits) <= abs(best.total_rounds - visits):
            best = schedule
        if schedule.total_rounds >= visits:
            break
    return best


def block_count(model_dir: Path, layers_per_block: int) -> int:
    return len(block_specs(model_dir, layers_per_block))


def block_specs(model_dir: Path, layers_per_block: int):
    import torch

    from fedcybgd.common.modeling import config_from_json, model_from_config
    from fedcybgd.common.partition import partition_model

    model = model_from_config(config_from_json((model_dir / "config.json").read_text()), torch.bfloat16, "meta")
    return partition_model(model, layers_per_block)
