"""The `jointrag` command line: index, retrieve, ask, eval, serve, train, plot, compare, variance, dialog-data.

Every subcommand has defaults that run on the embedded dataset (SQuAD v1.1 dev part) with the
default models, so `jointrag eval` alone builds the default index if needed and evaluates the test
split. User errors print one line and exit with status 2; `--json` prints machine-readable output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from .errors import UserError

EXIT_USER_ERROR = 2
INDEX_DIST_TIMEOUT = 3600  # seconds a rank of `torchrun ... index` waits for the others (rank 0 stores the corpus alone)


def positive_int(value: str) -> int:
    """An argparse type for counts that must be at least 1 (k, batch sizes, beams, limits)."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {number}")
    return number


def parse_params(pairs: list[str]) -> dict:
    """`key=value` index settings; values are ints where they look like ints."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--param expects key=value, got '{pair}'")
        params[key] = int(value) if value.lstrip("-").isdigit() else value
    return params


def build(args, sharded: bool = False):
    """The index `args` describe (`retrieval.resolve.build_from_file`)."""
    from .retrieval.resolve import build_from_file

    return build_from_file(args.corpus, args.out, format=args.format, chunk_words=args.chunk_words, retriever=args.retriever,
                           kind=args.kind, params=parse_params(args.param), batch_size=args.batch_size,
                           precision=args.precision, memory_check=not args.no_memory_check, sharded=sharded)


def pipeline_of(args):
    """The `api.Pipeline` the options name: --checkpoint (its own index, retriever and generator), or
    --index searched with --retriever and --param, answering with --generator, --template, --chat and
    --precision. Nothing loads until it is used."""
    from .api import Pipeline

    if getattr(args, "checkpoint", None):
        return Pipeline.from_checkpoint(args.checkpoint, template=args.template)
    return Pipeline.from_index(args.index, retriever=args.retriever, search=parse_params(args.param),
                               generator=getattr(args, "generator", None), template=getattr(args, "template", None),
                               chat=getattr(args, "chat", False), precision=getattr(args, "precision", "auto"))


def print_table(metrics: dict) -> None:
    width = max(len(key) for key in metrics)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value}")


def cmd_index(args) -> None:
    from .distributed import process_group

    with process_group(INDEX_DIST_TIMEOUT):  # under torchrun: every rank encodes its share of the corpus
        index = build(args, sharded=True)
    if index is None:  # not rank 0
        return
    summary = {"index": str(index.directory), **{k: index.manifest[k] for k in ("kind", "count", "build_seconds")}}
    print(json.dumps(summary) if args.json else f"built {'an' if summary['kind'][0] in 'aeiou' else 'a'} {summary['kind']} index of {summary['count']} passages in {summary['index']} ({summary['build_seconds']} s)")


def cmd_retrieve(args) -> None:
    results = pipeline_of(args).retrieve(args.question, args.k)
    rows = [
        {"question": q, "passages": [{"rank": h.rank, "score": round(h.score, 4), "id": h.id, "title": h.title, "text": h.text} for h in hits]}
        for q, hits in zip(args.question, results)
    ]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))  # a list, one entry per question, however many
        return
    for row in rows:
        print(f"Q: {row['question']}")
        for p in row["passages"]:
            print(f"  {p['rank']:>3}. [{p['score']:.4f}] {p['id']}  {p['text'][:100]}")


def cmd_ask(args) -> None:
    [answer] = pipeline_of(args).answer(args.question, k=args.k, contexts=args.contexts, decode=args.decode,
                                        max_new_tokens=args.max_new_tokens, beams=args.beams, tau=args.tau)
    passages = [{"rank": h.rank, "score": round(h.score, 4), "id": h.id, "title": h.title, "text": h.text, "used": h.used}
                for h in answer.passages]
    if args.json:
        chosen = {"chosen": answer.chosen} if answer.chosen is not None else {}
        print(json.dumps({"question": args.question, "answer": answer.answer, "passages": passages, **chosen}, ensure_ascii=False))
        return
    print(f"Answer: {answer.answer}\n\nPassages:")
    for p in passages:
        print(f"  {p['rank']:>3}. [{p['score']:.4f}]{' *' if p['used'] else '  '} {p['id']}  {p['text'][:100]}")
    if answer.chosen is not None:
        print(f"\nThe bridge chose {' '.join(answer.chosen) or 'no passage'}: the generator read them in that order")
    print("\n(* = given to the generator)")


def checkpoint_training_data(checkpoint: str | None) -> str | None:
    """The training file (data.train) of the run that wrote `checkpoint`; None for the embedded questions."""
    from .config import load_config

    saved = Path(checkpoint or "") / "config.yaml"
    return load_config(str(saved)).data.train if checkpoint and saved.is_file() else None


def cmd_eval(args) -> None:
    from .api import evaluate
    from .data.qa import embedded_examples, load_examples
    from .io import check_out_dir

    out = Path(args.out)
    check_out_dir(out)
    if not args.data and args.split is None:
        args.split = "test"
        trained_on = checkpoint_training_data(args.checkpoint)
        if trained_on:
            raise UserError(f"--checkpoint {args.checkpoint} was trained on {trained_on}: pass --data FILE to evaluate on held-out "
                            "questions of your data, or --split test to evaluate on the embedded SQuAD split on purpose")
    examples = load_examples(args.data, args.data_format) if args.data else embedded_examples(args.split)
    if args.limit:
        examples = examples[: args.limit]
    if not examples:
        raise UserError(f"{args.data or f'the embedded {args.split} split'}: no questions to evaluate")
    metrics = evaluate(pipeline_of(args), examples, k=args.k, contexts=args.contexts, decode=args.decode,
                       max_new_tokens=args.max_new_tokens, beams=args.beams, tau=args.tau, batch_size=args.batch_size,
                       retrieval_only=args.retrieval_only, out=out, name=args.data or f"embedded:{args.split}")
    if args.json:
        print(json.dumps(metrics))
    else:
        print_table(metrics)
        print(f"\nwrote {out / 'predictions.jsonl'} and {out / 'metrics.json'}")


def cmd_serve(args) -> None:
    from .api import Pipeline, is_checkpoint
    from .serve import serve

    compare = None
    if args.compare:
        compare = (Pipeline.from_checkpoint(args.compare, template=args.template) if is_checkpoint(args.compare) else
                   Pipeline.from_index(args.compare, generator=args.generator, template=args.template, chat=args.chat,
                                       precision=args.precision))
    serve(pipeline_of(args), compare=compare, host=args.host, port=args.port, runs=args.runs, window=args.batch_window_ms / 1000,
          max_batch=args.max_batch, json_output=args.json)


def cmd_dialog_data(args) -> None:
    """Convert a dialog set into QA JSONL files split by dialog, and its knowledge into a corpus."""
    from .data.qa import save_examples
    from .io import check_out_dir, write_jsonl
    from .data.dialog import dialog_id, load_dialog, split_by_dialog

    out = Path(args.out)
    check_out_dir(out)
    examples, passages = load_dialog(args.input, args.format, args.last_turns or None)
    splits = dict(zip(("train", "test"), split_by_dialog(examples, args.test_fraction, args.seed)))
    out.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        save_examples(out / f"{name}.jsonl", split)
    write_jsonl(out / "corpus.jsonl", ({"id": p.id, "title": p.title, "text": p.text} for p in passages))
    summary = {"out": str(out), "passages": len(passages)}
    for name, split in splits.items():
        summary[name] = {"examples": len(split), "dialogs": len({dialog_id(e) for e in split})}
    if args.json:
        print(json.dumps(summary))
        return
    for name in splits:
        print(f"{out / name}.jsonl: {summary[name]['examples']} examples from {summary[name]['dialogs']} dialogs")
    print(f"{out / 'corpus.jsonl'}: {len(passages)} passages")


def cmd_plot(args) -> None:
    from .evaluation.plot import plot_run

    paths = plot_run(args.run_dir)
    if args.json:
        print(json.dumps([str(path) for path in paths]))
        return
    if not paths:
        print(f"nothing to plot yet in {Path(args.run_dir) / 'metrics.jsonl'}", file=sys.stderr)
    for path in paths:
        print(path)


def cmd_compare(args) -> None:
    from .evaluation.compare import compare, format_report, plot_report
    from .io import names

    report = compare(args.runs, reference=args.reference, metrics=names(args.metrics) if args.metrics else None,
                     resamples=args.resamples, seed=args.seed)
    report["plot"] = str(plot_report(report, args.plot)) if args.plot else None
    if args.json:
        print(json.dumps(report))
        return
    print(format_report(report))
    if args.plot:
        print(f"\nwrote {args.plot}")


def cmd_train(args) -> None:
    from .config import describe, load_config

    if args.help_config:
        print(describe())
        return
    if args.resume and args.config is None:  # continue with the run's own settings, not the defaults
        from .config import RunConfig

        saved = Path(args.out or RunConfig().out) / "config.yaml"
        if saved.is_file():
            args.config = str(saved)
            print(f"jointrag: resuming with the settings of {saved}", file=sys.stderr)
    shorthands = {"method.name": args.method, "data.train": args.data, "model.index": args.index, "out": args.out, "train.steps": args.steps}
    overrides = [f"{key}={value}" for key, value in shorthands.items() if value is not None] + args.overrides
    config = load_config(args.config, overrides)
    from .distributed import is_main
    from .methods import method
    from .train import train

    metrics = train(config, resume=args.resume)
    if not is_main():  # under torchrun, rank 0 reports
        return
    pipeline = method(config.method.name).pipeline is not None
    if not pipeline:  # the fields eval --json has: what was evaluated, with what
        metrics = {"data": f"dev: {config.data.dev or 'embedded'}", "index": config.model.index or "default",
                   "checkpoint": str(Path(config.out) / "checkpoint"), "decode": config.eval.decode, **metrics}
    if args.json:
        print(json.dumps(metrics))
    elif pipeline:
        from .train.pipeline import format_table

        print(format_table(metrics))
        print(f"\nwrote {config.out}/: " + method(config.method.name).outputs.format(decode=config.eval.decode))
    else:
        print_table(metrics)
        print(f"\nwrote {config.out}/checkpoint, metrics.jsonl, tensorboard/ and plots/")


def cmd_variance(args) -> None:
    from .train.variance import format_table, run_variance

    report = run_variance(
        args.config, checkpoint=args.checkpoint, overrides=args.overrides, examples=args.examples,
        batch_size=args.batch_size, repeats=args.repeats, batches=args.batches, out=args.out,
    )
    if args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
        print(f"\nwrote {Path(args.out) / 'variance.json'} and {Path(args.out) / 'variance.png'} ({report['seconds']} s)")


def cmd_export(args) -> None:
    from .export import export

    record = export(args.checkpoint, args.out, merge=not args.no_merge)
    if args.json:
        print(json.dumps(record))
        return
    out = Path(args.out)
    for name, tower in record.get("towers", {}).items():
        print(f"{out / name}: sentence-transformers directory, {tower['pooling']} pooling (fingerprint {tower['fingerprint']})")
    if record.get("tied"):
        print("  the query and passage towers are tied: both directories hold the same weights")
    if record["index"].get("accepts_passage_encoder") is False:
        print(f"  the index {record['index']['directory']} was built by an earlier state of the passage tower; rebuild it "
              f"with `jointrag index --retriever {out / 'passage_encoder'}` to search with the exported towers")
    for part in ("generator", "bridge"):
        if part in record:
            print(f"{out / part}: save_pretrained directory{' (LoRA merged)' if record[part]['merged'] else ''}")
            if record[part]["lora"]:
                adapter = record[part]["adapter"]
                print(f"{out / adapter['directory']}: its LoRA adapter (base model {adapter['base_model_name_or_path']})")
    print(f"{out / 'export.json'}: what was exported, from {record['checkpoint']}")


def add_index_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", help="index directory (default: the embedded SQuAD index, built on first use)")
    parser.add_argument("--retriever", help="query encoder (default: the one named in the index manifest)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="search setting, e.g. nprobe=32 or ef_search=256")
    parser.add_argument("-k", type=positive_int, default=5, help="passages to retrieve (default 5)")


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generator", help="hub id, directory or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--contexts", type=non_negative_int, default=1, help="top passages put in the prompt (default 1)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=16,
                        help="answer length limit in tokens (default 16, for short answers); eval notes on stderr when the median "
                             "reference answer has more words than this (long-form QA such as ClapNQ): raise it there")
    parser.add_argument("--beams", type=positive_int, default=1, help="beam size; 1 is greedy")
    parser.add_argument("--template", help="YAML file with the prompt: template, passage_template, separator (default: a two-shot QA prompt)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the generator's chat template")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="generation precision; auto = bf16 where the hardware runs it fast")
    parser.add_argument("--checkpoint", help="a trained model, RUN_DIR/checkpoint: its index, retriever, generator and prompt; "
                                             "a BGM checkpoint (RUN_DIR/ppo/checkpoint) answers through its bridge (--beams: the bridge's)")
    parser.add_argument("--decode", choices=["top1", "rag-sequence-fast", "rag-sequence-thorough", "rag-token", "ensemble"], help="top1: the top --contexts passages in one prompt (default); the RAG decoders and RA-DIT's ensemble mix one prompt per passage (a checkpoint's default: its eval.decode)")
    parser.add_argument("--tau", type=float, help="retrieval temperature of the RAG decoders (default 0.1, or the checkpoint's)")


def make_parser() -> argparse.ArgumentParser:
    from .methods import METHODS

    parser = argparse.ArgumentParser(prog="jointrag", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"jointrag {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("index", help="store and encode a corpus and build its index")
    p.add_argument("--corpus", help="passages: .jsonl, .tsv (DPR) or SQuAD .json, optionally .gz (default: the embedded SQuAD paragraphs)")
    p.add_argument("--format", choices=["jsonl", "tsv", "squad"], help="corpus format (default: from the file name)")
    p.add_argument("--out", help="index directory (default: the default index location)")
    p.add_argument("--kind", choices=["exact", "flat", "hnsw", "ivfpq", "bm25"], default="exact")
    p.add_argument("--retriever", help="encoder: hub id, directory or sentence-transformers directory (default: all-MiniLM-L6-v2)")
    p.add_argument("--chunk-words", type=positive_int, help="split passages into chunks of at most N words (DPR uses 100)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="index setting, e.g. nlist=1024, m=48, M=32")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="corpus encoding precision; auto = bf16 where the hardware runs it fast")
    p.add_argument("--no-memory-check", action="store_true", help="build even if the index looks too large for the memory available "
                                                                  "(same as JOINTRAG_NO_MEMORY_CHECK=1)")
    p.set_defaults(run=cmd_index)

    p = commands.add_parser("retrieve", help="print the top-k passages for questions")
    add_index_options(p)
    p.add_argument("question", nargs="+")
    p.set_defaults(run=cmd_retrieve)

    p = commands.add_parser("ask", help="answer a question and show the passages used")
    add_index_options(p)
    add_generation_options(p)
    p.add_argument("question")
    p.set_defaults(run=cmd_ask)

    p = commands.add_parser("eval", help="answer a QA set; write predictions.jsonl and metrics.json")
    add_index_options(p)
    add_generation_options(p)
    p.add_argument("--data", help="QA file: SQuAD .json, .jsonl (question, answers, optionally history), DPR .json, NQ-open .jsonl (default: the embedded set)")
    p.add_argument("--data-format", choices=["squad", "jsonl", "dpr", "nq-open"])
    p.add_argument("--split", choices=["train", "dev", "test", "all"],
                   help="split of the embedded set (default test; required with a --checkpoint trained on your own --data)")
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N examples")
    p.add_argument("--retrieval-only", action="store_true", help="skip generation; retrieval metrics only")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--out", default="runs/eval", help="output directory (default runs/eval)")
    p.set_defaults(run=cmd_eval)

    p = commands.add_parser("serve", help="an HTTP server and web page: retrieve, answer (streamed), OpenAI-compatible chat, run views")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a trained model, RUN_DIR/checkpoint (default: --index)")
    source.add_argument("--index", help="index directory (default: the embedded SQuAD index, built on first use)")
    p.add_argument("--retriever", help="query encoder of --index (default: the one named in the index manifest)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="search setting, e.g. nprobe=32 or ef_search=256")
    p.add_argument("--generator", help="hub id, directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--template", help="YAML file with the prompt: template, passage_template, separator (default: a two-shot QA prompt)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the generator's chat template")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="generation precision; auto = bf16 where the hardware runs it fast")
    p.add_argument("--compare", metavar="CHECKPOINT_OR_INDEX", help="a second model answering beside the first (an index answers "
                                                                   "with --generator): the page shows both, requests pick it with model=compare")
    p.add_argument("--run", action="append", default=[], dest="runs", metavar="RUN_DIR", help="a run directory shown at /runs: its plots/*.png and "
                                                                                 "predictions.jsonl (or eval/predictions.jsonl); repeat it to compare runs")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=non_negative_int, default=8000, help="port (default 8000; 0: a free one, printed)")
    p.add_argument("--batch-window-ms", type=float, default=15.0, help="how long the first waiting request waits for others to "
                                                                       "join its batch (default 15)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="questions run as one batch at most (default 16)")
    p.set_defaults(run=cmd_serve)

    p = commands.add_parser("train", help="train a RAG model: " + ", ".join(METHODS))
    p.add_argument("--config", help="YAML recipe (see configs/); settings not given keep their defaults")
    p.add_argument("--method", choices=list(METHODS), help="shorthand for --set method.name=...")
    p.add_argument("--data", help="training QA file (shorthand for --set data.train=...; default: the embedded train split)")
    p.add_argument("--index", help="index directory (shorthand for --set model.index=...)")
    p.add_argument("--out", help="run directory (shorthand for --set out=...)")
    p.add_argument("--steps", type=positive_int, help="shorthand for --set train.steps=...")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides", help="any setting, e.g. method.k=10 or train.lr_generator=1e-5 (see --help-config)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--help-config", action="store_true", help="list every setting with its default and meaning, then exit")
    p.set_defaults(run=cmd_train)

    p = commands.add_parser("dialog-data", help="convert a dialog set into train/test JSONL split by dialog and a corpus JSONL")
    p.add_argument("--input", required=True, help="DSTC9/DSTC10 track 2 or DSTC11 track 5 folder or logs file (knowledge.json beside it "
                                                  "or one folder up), MTRAG-UN or OR-QuAC JSON Lines, DoQA JSON")
    p.add_argument("--format", choices=["dstc9", "dstc11", "mtrag", "orquac", "doqa"],
                   help="dialog format; dstc9 also reads DSTC10 track 2 (default: detected, DSTC9/10 or DSTC11 from knowledge.json)")
    p.add_argument("--out", required=True, help="directory for train.jsonl, test.jsonl and corpus.jsonl")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of the dialogs held out for test (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dialog shuffle (default 0)")
    p.add_argument("--last-turns", type=non_negative_int, default=3, help="turns the retrieval query is built from (default 3; 0: all)")
    p.set_defaults(run=cmd_dialog_data)

    p = commands.add_parser("plot", help="draw a training run's metrics.jsonl as PNGs in RUN_DIR/plots")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(run=cmd_plot)

    p = commands.add_parser("compare", help="paired comparison of evaluated runs on the same questions: wins/ties/losses, "
                                            "sign test, bootstrap interval, mean ± std over seeds")
    p.add_argument("runs", nargs="+", metavar="[NAME=]PATH[,PATH...]",
                   help="an eval --out directory or a predictions .jsonl; NAME=PATH,PATH,... groups the seeds of one method")
    p.add_argument("--reference", metavar="NAME", help="the group the others are compared against (default: the first)")
    p.add_argument("--metrics", help="comma-separated, e.g. em,f1,gold_recall@5 (default: em, f1, rouge_l and gold_recall@k "
                                     "where scored, answer_recall@k where no gold passages are known)")
    p.add_argument("--resamples", type=positive_int, default=10_000, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument("--plot", metavar="FILE", help="also draw each difference with its interval in this PNG")
    p.set_defaults(run=cmd_compare)

    p = commands.add_parser("variance", help="variance of each method's retriever gradient (RAG, VRAG, JSA) on one model state")
    p.add_argument("--config", help="YAML recipe giving the models and method options (default: the default models)")
    p.add_argument("--checkpoint", help="measure a trained model, RUN_DIR/checkpoint, instead of the base models")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides", help="any setting, e.g. method.k=10 or method.proposals=50 (see train --help-config)")
    p.add_argument("--examples", type=positive_int, help="dev examples sampled for the batches (default: batch size x batches)")
    p.add_argument("--batch-size", type=positive_int, default=2, help="examples per mini-batch (default 2)")
    p.add_argument("--repeats", type=positive_int, default=8, help="draws R of each objective on one fixed batch (default 8, at least 2)")
    p.add_argument("--batches", type=positive_int, default=8, help="mini-batches N, one gradient each (default 8, at least 2)")
    p.add_argument("--out", default="runs/variance", help="output directory for variance.json and variance.png (default runs/variance)")
    p.set_defaults(run=cmd_variance)

    p = commands.add_parser("export", help="write a checkpoint's towers as sentence-transformers directories and its generator "
                                           "as a save_pretrained directory, for use without jointrag")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a trained model, RUN_DIR/checkpoint")
    p.add_argument("--out", required=True, help="export directory: query_encoder/, passage_encoder/, generator/, "
                                                "generator_adapter/ (LoRA), export.json")
    p.add_argument("--no-merge", action="store_true", help="a LoRA generator: write its base weights to generator/ "
                                                           "instead of merging the adapter into them")
    p.set_defaults(run=cmd_export)

    for name, sub in commands.choices.items():
        sub.add_argument("--json", action="store_true", help="machine-readable output")
        if name not in ("plot", "compare", "dialog-data"):  # the commands that run models
            sub.add_argument("--device", help="where the generator runs: auto (default: the GPU when there is one, under torchrun "
                                              "cuda:LOCAL_RANK; else the CPU), cpu, cuda or cuda:N")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if getattr(args, "device", None):
        from .runtime import DEVICE_VARIABLE

        os.environ[DEVICE_VARIABLE] = args.device
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        args.run(args)
    except UserError as error:
        print(f"jointrag: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("jointrag: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
