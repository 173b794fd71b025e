"""The `dynsdpb` command line: parses the arguments, then imports the tool that runs the command
(dynsdpb_kernels.tools), so `import dynsdpb_kernels` never loads a tool."""

from __future__ import annotations

import argparse
from pathlib import Path


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _str_list(text: str) -> list[str]:
    return text.split(",")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand. Help strings are %-format templates (argparse expands %(default)s in
    them), so a literal percent sign is written %%."""
    parser = argparse.ArgumentParser(prog="dynsdpb", description="DynSDPB fused-loss kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    defaults_shown = argparse.ArgumentDefaultsHelpFormatter  # every output path is named in --help
    bench = commands.add_parser(
        "bench", help="time the fused loss against eager PyTorch, torch.compile and Liger", formatter_class=defaults_shown
    )
    bench.add_argument("--n", type=_int_list, default=[1024, 4096], help="rows, comma-separated")
    bench.add_argument("--v", type=_int_list, default=[32000, 49152, 128256], help="vocabulary sizes")
    bench.add_argument("--dtype", type=_str_list, default=["float32", "bfloat16"])
    bench.add_argument("--mode", type=_str_list, default=["forward", "full"], help="forward and/or full (forward+backward)")
    bench.add_argument("--providers", type=_str_list, default=["ours", "eager", "compile", "liger"])
    bench.add_argument("--device", default=None, help="cuda or cpu; None: cuda when available")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument(
        "--csv", type=Path, default=Path("dynsdpb_bench/results.csv"),
        help="results are appended to this file (relative paths are under the current directory)",
    )
    bench.add_argument(
        "--png", type=Path, default=Path("dynsdpb_bench/results.png"),
        help="plot of every result in --csv, drawn when matplotlib is installed",
    )
    head = commands.add_parser(
        "bench-head", help="peak memory and time of the LM head + loss step, fwd+bwd (prints a table, writes nothing)",
        formatter_class=defaults_shown,
    )
    head.add_argument("--n", type=int, default=2048, help="rows (tokens)")
    head.add_argument("--v", type=int, default=49152, help="vocabulary size")
    head.add_argument("--h", type=int, default=576, help="hidden size")
    head.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    head.add_argument("--providers", type=_str_list, default=["ours", "ours-dense", "eager", "liger"])
    head.add_argument("--device", default=None, help="cuda or cpu; None: cuda when available")
    head.add_argument("--repeats", type=int, default=2)
    ring = commands.add_parser(
        "bench-ring", help="a DLB step (two calls, fwd+bwd) with a dense and a top-k teacher ring, interleaved (prints a table)",
        formatter_class=defaults_shown,
    )
    ring.add_argument("--v", type=_int_list, default=[32000, 128256], help="vocabulary sizes")
    ring.add_argument("--dtype", type=_str_list, default=["float32", "bfloat16"])
    ring.add_argument("--samples", type=int, default=8, help="samples per call (half taught by the ring, half new)")
    ring.add_argument("--tokens", type=int, default=256, help="tokens per sample")
    ring.add_argument("--device", default=None, help="cuda or cpu; None: cuda when available")
    ring.add_argument("--repeats", type=int, default=3)
    finetune = commands.add_parser(
        "finetune", help="fine-tune a small LLaMA with cross-entropy and with DynSDPB from the same start, and compare",
        formatter_class=defaults_shown,
    )
    finetune.add_argument("--model", default="auto", help="auto (SmolLM2 when installed, else tiny), smollm2, tiny, or a local folder")
    finetune.add_argument("--data", type=Path, default=None, help="a .jsonl(.gz) with question/solution/split records; None: the shipped GSM-style problems")
    finetune.add_argument("--steps", type=int, default=16)
    finetune.add_argument("--batch-size", type=int, default=2, help="new samples per step")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument(
        "--out", type=Path, default=Path("finetune_out"),
        help="folder that receives results.json and loss_curves.png (relative paths are under the current directory)",
    )
    finetune.add_argument("--max-length", type=int, default=None, help="tokens per example; None: 128, or 512 for byte tokens")
    finetune.add_argument("--eval-samples", type=int, default=24)
    finetune.add_argument("--lr", type=float, default=None)
    finetune.add_argument("--fused-linear", action="store_true", help="DynSDPB arm: loss from the hidden states (no logits)")
    finetune.add_argument("--teacher-storage", choices=["dense", "topk"], default="dense")
    finetune.add_argument("--topk", type=int, default=64, help="k for --teacher-storage topk")
    study = commands.add_parser(
        "study", help="CE vs DLB vs DynSDPB (the two halves of the dynamic rule, compute-matched CE, last-visit teachers) over seeds: held-out scores with 95%% CIs and cost",
        formatter_class=defaults_shown,
    )
    study.add_argument(
        "--out", type=Path, default=Path("dynsdpb_study"),
        help="folder that receives results.csv, summary.json/.txt/.md, <task>.png, curves.png and runs/ (one JSON per run; "
        "a rerun with the same --out continues where a killed one stopped)",
    )
    study.add_argument("--tiny", action="store_true", help="CI configuration: tiny random LLaMA, 2 seeds, a few steps")
    study.add_argument("--seeds", type=int, default=None, help="seeds per arm and task (None: 5, or 2 with --tiny)")
    study.add_argument(
        "--arms", type=_str_list, default=None,
        help="comma-separated, of ce,ce_rerun,dlb,dynsdpb,alpha_only,tau_only (the default) and the compute-matched arms "
        "ce_long,ce_ls,lastvisit,lastvisit_static,lastvisit_ramp; 'compute': ce,ce_long,ce_ls,ce_rerun,dlb,dynsdpb,lastvisit,lastvisit_static,lastvisit_ramp",
    )
    study.add_argument("--epochs", type=int, default=None, help="passes over the train split per run (None: each task's fixed steps)")
    study.add_argument("--tasks", type=_str_list, default=None, help="comma-separated, of sentiment,gsm (None: both)")
    study.add_argument("--threads", type=int, default=None, help="torch threads (None: torch's default, one per core)")
    study.add_argument("--lr", type=float, default=None, help="learning rate of every task (None: each task's default, 1e-4); another --out")
    study.add_argument("--summarize-only", action="store_true", help="only rewrite results.csv, summary.json/.txt/.md and the plots from the stored runs")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    if args.command == "study":
        from .tools.study import StudyConfig, run_study, summarize

        config = StudyConfig.tiny(args.out) if args.tiny else StudyConfig(out=args.out)
        from .tools.study import COMPUTE_ARMS

        arms = COMPUTE_ARMS if args.arms == ["compute"] else args.arms
        overrides = {"seeds": args.seeds, "arms": arms, "tasks": args.tasks, "threads": args.threads, "epochs": args.epochs}
        for name, value in overrides.items():
            if value is not None:  # check_config names bad values (seeds 0, unknown arms, ...)
                setattr(config, name, tuple(value) if isinstance(value, list) else value)
        if args.lr is not None:
            config.with_lr(args.lr)
        if args.summarize_only:
            summarize(config)
        else:
            run_study(config)

    if args.command == "bench-ring":
        import torch

        from .tools.ring_benchmark import run_ring_bench

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        run_ring_bench(args.v, args.dtype, device, args.repeats, args.samples, args.tokens)

    if args.command == "bench-head":
        import torch

        from .tools.head_benchmark import run_head_grid

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        providers = [p for p in args.providers if p != "liger" or device == "cuda"]
        run_head_grid(args.n, args.v, args.h, args.dtype, device, providers, args.repeats)

    if args.command == "finetune":
        from .tools.finetune import DATA_PATH, FinetuneConfig, run

        run(
            FinetuneConfig(
                model=args.model,
                data=args.data or DATA_PATH,
                steps=args.steps,
                batch_size=args.batch_size,
                seed=args.seed,
                out=args.out,
                max_length=args.max_length,
                eval_samples=args.eval_samples,
                lr=args.lr,
                fused_linear=args.fused_linear,
                teacher_storage=args.teacher_storage,
                topk=args.topk,
            )
        )

    if args.command == "bench":
        import torch

        from .tools.benchmark import plot_csv, run_grid

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        providers = [p for p in args.providers if p != "liger" or device == "cuda"]
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        run_grid(args.n, args.v, args.dtype, args.mode, providers, device, args.repeats, args.csv)
        if plot_csv(args.csv, args.png):
            print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
