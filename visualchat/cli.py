"""`visualchat` command line: the composition root. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # VisualChat never fetches weights at run time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT_HELP = """commands:
  /image PATH   attach an image to your next message (repeat for several)
  /undo         remove the last exchange
  /retry        generate the last reply again
  /clear        start a new conversation
  /exit         quit (also Ctrl-D)
Ctrl-C while a reply streams stops it."""


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="VisualChat checkpoint folder (default: embedded model)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: auto)")
    parser.add_argument("--attention", choices=["mmca", "causal"], default=None)


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visualchat", description="Multi-image, multi-round visual chat."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    chat = commands.add_parser("chat", help="chat in the terminal (or answer one prompt)")
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.add_argument("--image", action="append", default=[], help="image for the prompt")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("prompt", nargs="?", help="answer this one prompt and exit")
    chat.set_defaults(run=cmd_chat)

    info = commands.add_parser("info", help="versions, device and model summary")
    _add_model_args(info)
    info.add_argument("--no-load", action="store_true", help="do not load the model")
    info.set_defaults(run=cmd_info)

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP API on the engine")
    serve.add_argument(
        "model", nargs="?", default=None, help="checkpoint folder (default: embedded)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("VISUALCHAT_API_KEY"))
    serve.add_argument(
        "--replicas", type=int, default=1, help="engine copies, least-loaded routing"
    )
    serve.add_argument("--served-model-name", default=None, help="id reported in /v1/models")
    serve.add_argument(
        "--allow-remote-images", action="store_true", help="fetch http(s) image URLs"
    )
    serve.add_argument("--budget", type=int, default=None, help="tokens per forward pass")
    serve.add_argument(
        "--no-chunking", action="store_true", help="whole prompts first (no SplitFuse)"
    )
    serve.add_argument("--max-cache-tokens", type=int, default=16384)
    serve.add_argument("--device", default=None)
    serve.add_argument("--dtype", default=None)
    serve.add_argument("--ui", action="store_true", help="also serve the web chat at /ui")
    serve.set_defaults(run=cmd_serve)

    ui = commands.add_parser("ui", help="the web chat (Gradio) in your browser")
    ui.add_argument("model", nargs="?", default=None, help="checkpoint folder (default: embedded)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--device", default=None)
    ui.add_argument("--dtype", default=None)
    ui.set_defaults(run=cmd_ui)

    blend = commands.add_parser("blend", help="build a blended multi-image dataset from a recipe")
    blend.add_argument("recipe", help="blend recipe YAML (see data_blend/recipes/)")
    _add_model_args(blend)  # the model whose tokenizer and image tokens measure lengths
    blend.add_argument("--no-progress", action="store_true")
    blend.set_defaults(run=cmd_blend)

    train = commands.add_parser(
        "train", help="train from a YAML recipe (same as python -m training.main)"
    )
    train.add_argument("recipe", help="training recipe YAML (see training/recipes/)")
    train.add_argument("--no-resume", action="store_true", help="refuse to continue a run")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value"
    )
    train.set_defaults(run=cmd_train)

    evaluate = commands.add_parser(
        "eval", help="exact-match accuracy of a checkpoint on a held-out blended set"
    )
    evaluate.add_argument("model", help="checkpoint folder (full or delta), or 'embedded'")
    evaluate.add_argument("--data", default="data/blends/embedded_heldout")
    evaluate.add_argument("--max-samples", type=int, default=None, help="records (default: all)")
    evaluate.add_argument("--max-tokens", type=int, default=8, help="reply tokens per question")
    evaluate.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="questions decoded together by the serving engine (1: the reference decoder)",
    )
    evaluate.add_argument("--json", default=None, help="also write the full report here")
    evaluate.add_argument(
        "--compare-to",
        default=None,
        metavar="REPORT.json",
        help="an earlier --json report of the same questions: print a paired comparison",
    )
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--dtype", default=None)
    evaluate.set_defaults(run=cmd_eval)

    quantize = commands.add_parser(
        "quantize", help="write a checkpoint with a weight-only quantized backbone"
    )
    quantize.add_argument("model", help="'embedded' (the embedded default) or a checkpoint folder")
    quantize.add_argument(
        "--format",
        required=True,
        choices=["fp6_e3m2", "fp5_e2m2", "fp4_e2m1", "int8", "int4"],
        help="weight format of the backbone's linear layers",
    )
    quantize.add_argument("--lorc-rank", type=int, default=0, help="LoRC rank (0: none)")
    quantize.add_argument("-o", "--output", required=True, help="output checkpoint folder")
    quantize.add_argument(
        "--skip",
        default="vision,projector,lm_head,embed_tokens",
        help="comma-separated module-name parts left in full precision",
    )
    quantize.add_argument("--dtype", default=None, help="dtype of the unquantized tensors")
    quantize.set_defaults(run=cmd_quantize)

    bench = commands.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bench_kinds = bench.add_subparsers(dest="bench", required=True)
    serving = bench_kinds.add_parser(
        "serving", help="engine vs HF generate: batching, SplitFuse, single stream, curve"
    )
    serving.add_argument("--model", default=None, help="checkpoint folder (default: embedded)")
    serving.add_argument("--out-dir", default="benchmarks/results")
    serving.add_argument(
        "--parts",
        default="batching,splitfuse,single_stream,curve",
        help="comma-separated subset of batching,splitfuse,single_stream,curve",
    )
    serving.add_argument(
        "--splitfuse-workload",
        choices=["mixed", "fastgen"],  # serving.bench.run.SplitFuseWorkload (imported lazily)
        default="mixed",
        help="mixed: streams decoding while long prompts arrive; fastgen: every request a long "
        "prompt (DeepSpeed-FastGen's setup)",
    )
    serving.add_argument(
        "--budget",
        type=int,
        default=None,
        help="token budget of the SplitFuse and curve engines (default: the engine's own pick)",
    )
    serving.add_argument(
        "--arrival-rate",
        type=float,
        default=None,
        help="SplitFuse: long prompts per second (Poisson; default 0.3 mixed, 0.2 fastgen)",
    )
    serving.add_argument(
        "--num-long-prompts",
        type=int,
        default=None,
        help="SplitFuse: long prompts that arrive (default 12 either way)",
    )
    serving.add_argument(
        "--num-streams",
        type=int,
        default=None,
        help="SplitFuse, mixed workload: image chats decoding while the long prompts arrive "
        "(default 32)",
    )
    serving.add_argument(
        "--splitfuse-rounds",
        type=int,
        default=1,
        help="SplitFuse: rounds of chunking on and off taking turns (on, off, off, on, ...); "
        "each mode pools its rounds (default 1: on, then off)",
    )
    serving.add_argument(
        "--batching-budget",
        type=int,
        default=256,
        help="the batching part also runs the engine with this token budget, for throughput "
        "(0: only the engine's own pick)",
    )
    serving.add_argument(
        "--batching-rounds",
        type=int,
        default=3,
        help="batching: rounds of the engine and HF's static batch taking turns (medians quoted)",
    )
    serving.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    serving.set_defaults(run=cmd_bench_serving)
    quant = bench_kinds.add_parser(
        "quant", help="weight formats: bytes, SQNR, perplexity, held-out accuracy, decode speed"
    )
    quant.add_argument("--model", default=None, help="checkpoint folder (default: embedded)")
    quant.add_argument("--formats", default="fp6_e3m2,fp5_e2m2,fp4_e2m1,int8,int4")
    quant.add_argument("--lorc-rank", type=int, default=8, help="rank of the LoRC rows (0: none)")
    quant.add_argument("--max-text-tokens", type=int, default=4096)
    quant.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    quant.add_argument("--stride", type=int, default=512, help="perplexity window step")
    quant.add_argument("--decode-tokens", type=int, default=32)
    quant.add_argument("--skip-accuracy", action="store_true")
    quant.add_argument("--eval-data", default="data/blends/embedded_heldout")
    quant.add_argument(
        "--max-eval-samples",
        type=int,
        default=24,
        help="held-out records per variant, from the start (the families cycle every 8)",
    )
    quant.add_argument(
        "--eval-max-tokens",
        type=int,
        default=8,
        help="reply tokens per question (gold answers are at most 4 tokens)",
    )
    quant.add_argument(
        "--eval-batch-size",
        type=int,
        default=32,
        help="questions decoded together by the serving engine (1: the reference decoder)",
    )
    quant.add_argument("--out", default="benchmarks/results/quant.json")
    quant.set_defaults(run=cmd_bench_quant)
    return parser


def _load(args: argparse.Namespace):
    from visualchat import VisualChat

    what = args.model or "the embedded default model"
    print(f"loading {what} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    vc = VisualChat.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, attention=args.attention
    )
    print(f"loaded in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return vc


def _sampling(args: argparse.Namespace):
    from visualchat.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def _print_stream(deltas) -> None:
    """Print a reply as it streams; Ctrl-C stops it (the partial reply is kept)."""
    try:
        for delta in deltas:
            print(delta, end="", flush=True)
    except KeyboardInterrupt:
        deltas.close()
        print(" [stopped]", end="")
    print(flush=True)


def cmd_chat(args: argparse.Namespace) -> int:
    from visualchat.images import ImageError
    from visualchat.processor import ContextLengthError

    try:
        params = _sampling(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    vc = _load(args)
    session = vc.chat(system=args.system, params=params)
    if args.prompt is not None:
        try:
            _print_stream(session.stream(args.prompt, images=args.image))
        except (ImageError, ContextLengthError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0
    return _repl(session, list(args.image), (ImageError, ContextLengthError, ValueError))


def _repl(session: Any, pending: list[str], user_errors: tuple[type[Exception], ...]) -> int:
    print("VisualChat — type /help for commands.", flush=True)
    while True:
        try:
            line = input(f"you{f' [{len(pending)} image(s)]' if pending else ''}> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        command, _, argument = line.partition(" ")
        try:
            if command in ("/exit", "/quit"):
                return 0
            elif command == "/help":
                print(CHAT_HELP)
            elif command == "/image":
                path = os.path.expanduser(argument.strip().strip("'\""))
                if not os.path.isfile(path):
                    print(f"error: no such file: {path}")
                else:
                    pending.append(path)
                    print(
                        f"attached {path} (Image {session.conversation.num_images + len(pending)})"
                    )
            elif command == "/undo":
                removed = session.undo()
                print("removed the last exchange" if removed else "nothing to undo")
            elif command == "/clear":
                session.reset()
                pending.clear()
                print("new conversation")
            elif command == "/retry":
                print("assistant> ", end="", flush=True)
                _print_stream(session.retry_stream())
            elif command.startswith("/"):
                print(f"unknown command {command}; /help lists them")
            else:
                print("assistant> ", end="", flush=True)
                _print_stream(session.stream(line, images=pending))
                pending.clear()
        except user_errors as err:
            print(f"\nerror: {err}")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from visualchat import __version__
    from visualchat.model.loading import cache_dir, embedded_gguf_path

    print(f"visualchat     {__version__}")
    print(f"python         {platform.python_version()} ({platform.machine()})")
    for package in ("torch", "transformers", "open_clip_torch", "gguf", "peft", "accelerate"):
        print(f"{package:<14} {_version(package)}")
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)"
    print(f"device         {device}")
    try:
        print(f"embedded gguf  {embedded_gguf_path()}")
    except FileNotFoundError as err:
        print(f"embedded gguf  missing: {err}")
    print(f"cache          {cache_dir()}")
    if args.no_load:
        return 0
    vc = _load(args)
    model = vc.model
    lm_config = model.language_model.config
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model          {args.model or 'embedded default'}")
    print(f"backbone       {lm_config.model_type} ({lm_config.num_hidden_layers} layers)")
    print(f"parameters     {num_params / 1e6:.1f} M ({model.dtype}, {model.device})")
    print(f"attention      {model.config.attention}")
    print(f"image tokens   {model.num_image_tokens} per image")
    print(f"context        {vc.processor.max_length} tokens")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.engine import EngineConfig
    from serving.openai_api import serve

    config = EngineConfig(
        max_num_batched_tokens=args.budget,
        chunked_prefill=not args.no_chunking,
        max_cache_tokens=args.max_cache_tokens,
    )
    print(f"serving on http://{args.host}:{args.port}/v1 (GET /health is 503 until loaded)")
    run = serve
    if args.ui:  # the web chat beside the API, on the same port
        from app.launch import UI_PATH, serve_with_ui

        run = serve_with_ui
        print(f"web chat on http://{args.host}:{args.port}{UI_PATH}")
    run(
        args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        replicas=args.replicas,
        engine_config=config,
        allow_remote_images=args.allow_remote_images,
        model_name=args.served_model_name,
        device=args.device,
        dtype=args.dtype,
    )
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from app.launch import launch_ui

    print(f"loading {args.model or 'the embedded default model'} ...", file=sys.stderr, flush=True)
    try:  # serves until Ctrl-C
        launch_ui(args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype)
    except KeyboardInterrupt:  # Ctrl-C before the server was up
        print("stopped", file=sys.stderr)
    return 0


def cmd_blend(args: argparse.Namespace) -> int:
    from data_blend.recipe import BlendRecipe
    from data_blend.run import run_blend
    from visualchat.template import ChatTemplate

    recipe = BlendRecipe.from_yaml(args.recipe)
    length_fn = None
    if recipe.max_length is not None:
        vc = _load(args)
        template: ChatTemplate = vc.processor.template
        tokenizer, per_image = vc.tokenizer, vc.model.num_image_tokens

        def length_fn(conversation) -> int:
            # Exactly the processor's count, without decoding any image.
            total = 0
            for segment in template.segments(conversation, add_generation_prompt=False):
                if segment.kind == "image":
                    total += per_image
                else:
                    total += len(tokenizer(segment.text, add_special_tokens=False)["input_ids"])
            return total

    summary = run_blend(recipe, length_fn=length_fn, progress=not args.no_progress)
    print(
        f"wrote {summary.output}: {summary.num_samples} conversations, {summary.num_images} images"
    )
    print(
        f"  rounds {summary.num_rounds}, truncated {summary.num_truncated} ({summary.seconds:.1f} s)"
    )
    for source, count in summary.source_counts.items():
        ratio = summary.realised_ratios.get(source, 0.0)
        print(f"  source {source}: {count} samples ({ratio:.1%})")
    for family, count in sorted(summary.families.items()):
        print(f"  family {family}: {count} questions")
    for source, reasons in summary.skipped.items():
        for reason, count in reasons.items():
            print(f"  skipped from {source}: {count} ({reason})")
    for reason, count in summary.dropped.items():
        print(f"  dropped: {count} ({reason})")
    return 0


def cmd_bench_serving(args: argparse.Namespace) -> int:
    from serving.bench.run import BenchConfig, format_table, run_serving_bench

    cfg = BenchConfig(
        model=args.model,
        out_dir=args.out_dir,
        splitfuse_workload=args.splitfuse_workload,
        splitfuse_budget=args.budget,
        batching_budget=args.batching_budget or None,
        batching_rounds=args.batching_rounds,
        splitfuse_rounds=args.splitfuse_rounds,
    )
    if args.batching_rounds < 1 or args.splitfuse_rounds < 1:
        print("error: --batching-rounds and --splitfuse-rounds must be positive", file=sys.stderr)
        return 2
    if args.arrival_rate is not None and args.arrival_rate <= 0:
        print("error: --arrival-rate must be positive", file=sys.stderr)
        return 2
    if args.num_long_prompts is not None and args.num_long_prompts < 1:
        print("error: --num-long-prompts must be positive", file=sys.stderr)
        return 2
    if args.num_streams is not None and args.num_streams < 0:
        print("error: --num-streams must not be negative", file=sys.stderr)
        return 2
    cfg = cfg.with_splitfuse_load(args.arrival_rate, args.num_long_prompts)
    if args.num_streams is not None:
        cfg.num_streams = args.num_streams
    if args.quick:
        cfg.num_chats, cfg.same_length, cfg.max_length = 4, 8, 16
        cfg.num_long_prompts, cfg.long_prompt_words, cfg.stream_tokens = 1, 200, 16
        cfg.num_streams = 2
        cfg.fastgen_requests, cfg.fastgen_tokens = 2, 8
        cfg.curve_rates, cfg.curve_requests, cfg.single_stream_tokens = (1.0,), 2, 8
        cfg.single_stream_rounds, cfg.batching_rounds = 2, 1
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = set(parts) - {"batching", "splitfuse", "single_stream", "curve"}
    if unknown:
        print(f"error: unknown benchmark parts {sorted(unknown)}", file=sys.stderr)
        return 2
    results = run_serving_bench(cfg, parts)
    print(format_table(results))
    print(f"wrote {results['json']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from training.main import main as train_main

    argv = [args.recipe, *(["--no-resume"] if args.no_resume else [])]
    return train_main(argv + [f"--set={override}" for override in args.set])


def cmd_eval(args: argparse.Namespace) -> int:
    from training.evaluate import compare_reports, evaluate_checkpoint, report_outcomes
    from visualchat.atomic import atomic_write_text

    model = None if args.model == "embedded" else args.model
    if model is not None and not os.path.isdir(model):
        print(f"error: no checkpoint folder at {model}", file=sys.stderr)
        return 2
    old = None
    if args.compare_to:  # read first: a bad file fails before minutes of evaluation
        try:
            with open(args.compare_to, encoding="utf-8") as f:
                old = json.load(f)
            report_outcomes(old)
        except (OSError, ValueError) as error:
            print(
                f"error: cannot read {args.compare_to} as an eval report: {error}", file=sys.stderr
            )
            return 2
    started = time.perf_counter()
    report = evaluate_checkpoint(
        model if model is not None else _embedded_answerer(args),
        args.data,
        max_samples=args.max_samples,
        max_tokens=args.max_tokens,
        device=args.device,
        dtype=args.dtype,
        progress=True,
        batch_size=args.batch_size,
    )
    print(report.table())
    print(f"({len(report.results)} questions in {time.perf_counter() - started:.0f} s)")
    if args.json:
        atomic_write_text(args.json, report.to_json() + "\n")
    if old is not None:
        try:
            print(compare_reports(report.to_dict(), old).summary())
        except ValueError as error:  # no question in common: the report above still stands
            print(f"error: cannot compare with {args.compare_to}: {error}", file=sys.stderr)
            return 2
    return 0


def _embedded_answerer(args: argparse.Namespace):
    if args.batch_size > 1:
        from serving.engine.engine import Engine

        return Engine.from_pretrained(None, device=args.device, dtype=args.dtype)
    from visualchat import VisualChat

    return VisualChat.from_pretrained(None, device=args.device, dtype=args.dtype)


def cmd_quantize(args: argparse.Namespace) -> int:
    from visualchat.model.loading import LoadOptions
    from visualchat.quant.convert import quantize_checkpoint

    skip = tuple(part.strip() for part in args.skip.split(",") if part.strip())
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    try:
        report = quantize_checkpoint(
            args.model,
            args.output,
            args.format,
            lorc_rank=args.lorc_rank,
            skip=skip,
            options=LoadOptions(device="cpu", dtype=args.dtype),
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def cmd_bench_quant(args: argparse.Namespace) -> int:
    from visualchat.quant.bench import (
        TABLE_HEADER,
        QuantBenchConfig,
        format_context,
        format_row,
        result_dict,
        run_quant_bench,
    )

    try:
        cfg = QuantBenchConfig(
            model=args.model,
            formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
            lorc_rank=args.lorc_rank,
            max_text_tokens=args.max_text_tokens,
            window=args.window,
            stride=args.stride,
            decode_tokens=args.decode_tokens,
            skip_accuracy=args.skip_accuracy,
            out=args.out,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    evaluate, note = None, None
    if not args.skip_accuracy:
        if os.path.isdir(args.eval_data):
            from training.evaluate import evaluate_checkpoint

            def evaluate(vc) -> dict:
                if args.eval_batch_size > 1:
                    from serving.engine.engine import Engine

                    # Batched greedy, the same answers; leaving the with-block gives the model
                    # its attention back (Engine.close).
                    chat = Engine(vc.model, vc.tokenizer)
                else:
                    chat = contextlib.nullcontext(vc)
                with chat as answerer:
                    report = evaluate_checkpoint(
                        answerer,
                        args.eval_data,
                        max_samples=args.max_eval_samples,
                        max_tokens=args.eval_max_tokens,
                        batch_size=args.eval_batch_size,
                    )
                summary = report.to_dict()
                return {
                    "data": args.eval_data,
                    "max_samples": args.max_eval_samples,
                    "max_tokens": args.eval_max_tokens,
                    "overall": summary["overall"],
                    "groups": summary["groups"],
                }
        else:
            note = f"skipped: no held-out set at {args.eval_data}"
    print(TABLE_HEADER, flush=True)
    results = run_quant_bench(
        cfg,
        evaluate=evaluate,
        accuracy_note=note,
        on_result=lambda r: print(format_row(result_dict(r)), flush=True),
    )
    print(format_context(results))
    print(f"wrote {results['json']} in {results['total_seconds']:.0f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
