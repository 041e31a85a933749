"""The `moemerge` command line: one thin command per job; settings live in recipes."""

from __future__ import annotations

import os
import signal
import sys
from functools import partial
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from mergekit_lite.errors import MoemergeError, PeerWaitError

app = typer.Typer(
    help="Grow dense Hugging Face checkpoints into Mixture-of-Experts or deeper models, then keep training them.\n\n"
         "Start with `moemerge quickstart` (offline, about a minute on a laptop CPU). Typical flow: "
         "`moemerge upcycle RECIPE -o OUT` (examples in recipes/upcycle/), `moemerge verify OUT --against DENSE`, "
         "`moemerge train RECIPE`, `moemerge check OUT`, `moemerge push OUT --repo ORG/NAME`.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click-style help: flags show no `<bool>`, arguments their metavar (RECIPE, MODEL)
)
err = Console(stderr=True, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

OUTPUT = typer.Option(None, "-o", "--output", help="output folder (wins over `output:` in the recipe)")
DRY_RUN = typer.Option(False, "--dry-run", help="print the plan (tensors, bytes, parameters) and write nothing")
OVERWRITE = typer.Option(False, "--overwrite", help="replace an existing output folder (never one that is, holds or "
                                                    "lies inside an input: refused before anything is written)")

WORKERS = typer.Option(None, "--workers", min=1, help="writer threads (wins over the recipe's workers; default: "
                                                       "from the cores and the output disk)")


def _nothing_written() -> str:
    return "interrupted, nothing written"


# what main() says on Ctrl-C (called then); a command whose interruption leaves something behind says what
INTERRUPTED = {"message": _nothing_written}


def _version(value: bool) -> None:
    if value:
        from mergekit_lite import __version__

        out.print(f"moemerge {__version__}")
        raise typer.Exit()


@app.callback()
def _setup(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                        help="print the version and exit")) -> None:
    """Options of `moemerge` itself."""


def echo(line: str) -> None:
    """Print on the main process only (rank 0 under torchrun / accelerate launch)."""
    from mergekit_lite.train.engine import is_main_process

    if is_main_process():
        out.print(line, markup=False)


def _upcycle_help() -> str:
    """The upcycle command's help, naming every target in the family table (a new family shows up by itself)."""
    from mergekit_lite.arch.tables import MOE

    native = ", ".join(fam.architecture.removesuffix("ForCausalLM") for fam in MOE.values()
                       if not fam.nests_text_config)
    return (f"Dense checkpoint -> Hugging Face MoE: a native class ({native}) or `architecture: moemerge`, the "
            "project's own classes for any family (Gemma3 too).")


@app.command(help=_upcycle_help())
def upcycle(recipe: Path = typer.Argument(..., metavar="RECIPE", help="upcycle recipe (YAML)"),
            output: Path | None = OUTPUT,
            dry_run: bool = DRY_RUN, overwrite: bool = OVERWRITE,
            verbose: bool = typer.Option(False, "--verbose", "-v", help="list every output tensor"),
            device: str | None = typer.Option(None, help="runs the base model for router.init=hidden: cpu, cuda, "
                                                            "cuda:1 ... (default: accelerate's choice)"),
            shard_size: str | None = typer.Option(None, "--shard-size", help="largest shard, e.g. 2GB (wins over "
                                                     "the recipe's shard_size, default 5GB)"),
            workers: int | None = WORKERS) -> None:
    """Upcycle a dense checkpoint into a Mixture-of-Experts model (help: `_upcycle_help`)."""
    from mergekit_lite.recipe import UpcycleRecipe, load_recipe

    load_recipe(recipe, UpcycleRecipe)  # before torch is imported: a recipe error answers at once
    from mergekit_lite.ops.upcycle import run_upcycle

    run_upcycle(recipe, output, dry_run=dry_run, overwrite=overwrite, verbose=verbose, device=device,
                shard_size=shard_size, echo=echo, workers=workers)


@app.command()
def graft(source: Path = typer.Argument(..., metavar="SOURCE",
                                        help="a model folder (with --drop or --expand) or a graft recipe (YAML)"),
          output: Path | None = OUTPUT,
          drop: int | None = typer.Option(None, "--drop", help="SOLAR depth up-scaling: n layers -> 2(n-m)"),
          expand: int | None = typer.Option(None, "--expand", help="LLaMA-Pro: insert K identity blocks"),
          dry_run: bool = DRY_RUN, overwrite: bool = OVERWRITE,
          shard_size: str | None = typer.Option(None, "--shard-size", help="largest shard, e.g. 5GB (default 5GB)"),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="list every output tensor"),
          workers: int | None = WORKERS) -> None:
    """Deeper models from layer slices: SOLAR --drop, LLaMA-Pro --expand, or a slices recipe."""
    from mergekit_lite.ops.graft import run_graft

    run_graft(source, output, drop=drop, expand=expand, dry_run=dry_run, overwrite=overwrite,
              shard_size=shard_size, verbose=verbose, echo=echo, workers=workers)


@app.command()
def train(recipe: Path = typer.Argument(..., metavar="RECIPE", help="train recipe (YAML)"),
          output: Path | None = OUTPUT,
          resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in OUTPUT"),
          overwrite: bool = typer.Option(False, "--overwrite", help="start again: remove only what an earlier run "
                                         "wrote in OUTPUT (checkpoints/, metrics.jsonl, final/, cache/, adapter/, "
                                         "plots); refused if OUTPUT holds anything else")
          ) -> None:
    """Continued pretraining with accelerate (CPU, one GPU, or `accelerate launch` for many)."""
    from mergekit_lite.recipe import TrainRecipe, load_recipe
    from mergekit_lite.recipe.paths import resolve_train_paths

    spec = load_recipe(recipe, TrainRecipe)  # before torch is imported: a recipe error answers at once
    spec = resolve_train_paths(spec, recipe)  # model and data beside the recipe, as for upcycle and ensemble
    from mergekit_lite.train.loop import train as run_train

    if output is not None:  # like upcycle/graft: one recipe, several runs side by side
        spec = spec.model_copy(update={"output": str(output)})
    INTERRUPTED["message"] = partial(_train_interrupted, Path(spec.output))
    summary = run_train(spec, recipe.read_text(), resume=resume, overwrite=overwrite, echo=echo)
    if summary.get("already_finished"):
        return
    echo(f"final val loss {summary['final_val_loss']:.4f} after {summary['steps']} steps, "
         f"{summary['tokens']} tokens, {summary['tokens_per_s']:.0f} tokens/s; model in {Path(spec.output) / 'final'}")


def _train_interrupted(out: Path) -> str:
    """Ctrl-C during train: the checkpoints written so far stay (atomic, resumable); no final model."""
    from mergekit_lite.train.preflight import latest_checkpoint

    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return f"interrupted; no checkpoint or final model written in {out}"
    return f"interrupted; checkpoints already written remain (latest {ckpt}); continue with --resume"


@app.command()
def ensemble(recipe: Path = typer.Argument(..., metavar="RECIPE", help="ensemble recipe (YAML)"),
             score: Path | None = typer.Option(None, "--score", metavar="FILE", help="instead of answering the "
                                                  "prompts: mean cross-entropy of each model and of the ensemble"),
             as_json: bool = typer.Option(False, "--json", help="print one JSON object (for scripts)"),
             device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: accelerate's choice)")
             ) -> None:
    """Combine models at inference: probability/logit averaging, perplexity weights, crowd vote, exchange, fuse."""
    from mergekit_lite.ensemble.run import run_ensemble
    from mergekit_lite.train.engine import is_main_process

    run_ensemble(recipe, score=score, as_json=as_json, device=device, progress=is_main_process(), echo=echo,
                 raw=lambda s: typer.echo(s) if is_main_process() else None)


@app.command()
def corpus(folder: Path = typer.Argument(Path("corpus"), metavar="FOLDER",
                                         help="where to write train.txt and val.txt")) -> None:
    """Write a small English corpus (the Python standard library's docstrings) for offline training."""
    from mergekit_lite.train.corpus import write_corpus

    for path in write_corpus(folder):
        echo(f"wrote {path} ({path.stat().st_size / 1e3:.0f} KB)")


@app.command()
def plot(run: Path = typer.Argument(..., metavar="RUN", help="a `moemerge train` output folder"),
         output: Path | None = typer.Option(None, "-o", "--output", help="where to write the PNGs (default: RUN)")
         ) -> None:
    """PNG plots of a training run: loss (train/val), learning rate, expert load per layer."""
    from mergekit_lite.train.plot import plot_run

    for path in plot_run(run, output, echo=echo):
        echo(f"wrote {path}")


@app.command()
def verify(model: Path = typer.Argument(..., metavar="MODEL", help="output model folder"),
           against: Path = typer.Option(..., "--against", help="the source model to compare with"),
           text: str | None = typer.Option(None, help="sample text (default: a built-in paragraph)"),
           device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: accelerate's choice)"),
           tolerance: float | None = typer.Option(None, help="exit 1 when max |Δlogits| exceeds this"),
           record: bool | None = typer.Option(None, "--record/--no-record",
                                                 help="store the figures in the folder's moemerge.json and model "
                                                      "card (default: only when --against is its recorded source)"
                                                 ),
           trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                                  help="run custom code that is not this version's moemerge code")
           ) -> None:
    """Compare logits with the source model: max/mean |Δlogits| and top-1 agreement."""
    from mergekit_lite.verify import compare_logits, is_recorded_source, record_parity, recorded_sources

    kwargs = {"text": text} if text else {}
    report = compare_logits(model, against, device=device, trust_remote_code=trust_remote_code, **kwargs)
    for line in report.lines():
        echo(line)
    own = is_recorded_source(model, against)
    if record is None and not own and recorded_sources(model):
        echo(f"  not recorded: {against} is not the source this folder records ({recorded_sources(model)[0]}); "
             "pass --record to store the figures anyway")
    elif (own if record is None else record) and record_parity(model, against, report):
        echo(f"  recorded in {model / 'moemerge.json'} and the model card")
    if tolerance is not None and report.max_abs > tolerance:
        err.print(f"max |Δlogits| {report.max_abs:.3e} exceeds tolerance {tolerance:.1e}")
        raise typer.Exit(1)


@app.command()
def inspect(model: Path = typer.Argument(..., metavar="MODEL", help="model folder")) -> None:
    """Architecture, layers, experts, parameters (total/active), dtype, shards, how it was built."""
    from mergekit_lite.inspect_model import describe, describe_lines

    for line in describe_lines(describe(model)):
        echo(line)


@app.command()
def quickstart(workdir: Path = typer.Option(Path("moemerge-quickstart"), help="where to build everything"),
               overwrite: bool = typer.Option(False, "--overwrite", help="remove what an earlier quickstart wrote "
                                              "in WORKDIR; refused if WORKDIR holds anything else")) -> None:
    """Offline demo: small dense Llama -> 8-expert MoE (parity) -> train both -> val-loss table and plots."""
    from mergekit_lite.quickstart import run_quickstart

    INTERRUPTED["message"] = lambda: (f"interrupted; what quickstart finished stays in {workdir}; run it again "
                                      "with --overwrite to start over")
    run_quickstart(workdir, overwrite=overwrite, echo=echo)


@app.command()
def check(model: Path = typer.Argument(..., metavar="MODEL", help="model folder"),
          trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                                 help="run custom code that is not this version's moemerge code")
          ) -> None:
    """Is this folder a sound checkpoint? Index/shards/headers, key set vs config class, tokenizer, no NaN/Inf."""
    from mergekit_lite.check import check_folder

    for line in check_folder(model, progress=echo, trust_remote_code=trust_remote_code).lines():
        echo(line)


@app.command()
def push(model: Path = typer.Argument(..., metavar="MODEL", help="model folder"),
         repo: str = typer.Option(..., "--repo", help="Hub repo id, ORG/NAME (created if needed)"),
         private: bool = typer.Option(False, "--private", help="create the repo private"),
         revision: str = typer.Option("main", "--revision", help="branch to commit to (created if needed)"),
         dry_run: bool = typer.Option(False, "--dry-run", help="check and list files and sizes; no network call"),
         include_checkpoints: bool = typer.Option(False, "--include-checkpoints",
                                                  help="also upload checkpoints/ and optimizer states"),
         trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                                help="check runs custom code that is not this version's moemerge code")
         ) -> None:
    """Check a model folder, then upload it to the Hugging Face Hub in one commit and print the URL."""
    from mergekit_lite.hub import push_folder

    INTERRUPTED["message"] = lambda: "interrupted; no commit was made (the Hub repo may already exist)"
    push_folder(model, repo, private=private, revision=revision, dry_run=dry_run,
                include_checkpoints=include_checkpoints, echo=echo, trust_remote_code=trust_remote_code)


def main() -> None:
    """Console entry point: user errors print one line and exit 2; Ctrl-C/SIGTERM exit 130."""
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    from mergekit_lite.threads import apply_default_threads

    apply_default_threads()  # before torch starts: one thread per usable core, shared among local ranks
    # our own output says what is happening: no transformers/datasets/hub bars. Read by those libraries when
    # imported, so --help, --version and recipe errors answer without importing them (a user's setting wins)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    INTERRUPTED["message"] = _nothing_written  # until a command says otherwise
    try:
        app()
    except MoemergeError as e:
        # under torchrun / accelerate launch every process meets the same user error: print it once per machine
        if os.environ.get("LOCAL_RANK", "0") == "0" or isinstance(e, PeerWaitError):
            # the message is plain text: a path or value with [brackets] must not be read as rich markup
            err.print(Text.assemble(("error:", "bold red"), " ", str(e)), highlight=False)
        if isinstance(e, PeerWaitError):
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(2)
        sys.exit(2)
    except (OSError, UnicodeDecodeError) as e:  # a file the user named cannot be read or written: one line
        if os.environ.get("LOCAL_RANK", "0") == "0":
            err.print(Text.assemble(("error:", "bold red"), " ", _os_error(e)), highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        _say_interrupted()
        sys.exit(130)
    except SystemExit as e:  # typer turns Ctrl-C inside a command into a silent exit 130
        if e.code == 130 and _from_ctrl_c(e):
            _say_interrupted()
        raise


def _os_error(e: BaseException) -> str:
    """One line for an OS or decoding error: what failed on which file, and what to check."""
    if isinstance(e, UnicodeDecodeError):
        return (f"a file is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 "
                "(recipes, config.json, metrics.jsonl and tokenizer files are read as UTF-8)")
    where = f" {getattr(e, 'filename', None)}" if getattr(e, "filename", None) else ""
    hint = {13: "check the permissions", 28: "free some disk space", 30: "the filesystem is read-only",
            2: "check the path", 21: "a folder was given where a file is needed",
            20: "a file was given where a folder is needed"}.get(getattr(e, "errno", None) or 0, "check the path")
    return f"{getattr(e, 'strerror', None) or type(e).__name__}:{where}; {hint}"


def _from_ctrl_c(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt lies in the exception's chain (typer re-raises it as Exit(130))."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _say_interrupted() -> None:
    from mergekit_lite.train.engine import is_main_process

    if is_main_process():  # every process of a launch gets the signal; one says so
        # on a line of its own: a progress bar may have left the cursor at the end of its line
        err.print(("\n" if sys.stderr.isatty() else "") + INTERRUPTED["message"](), markup=False, highlight=False)


if __name__ == "__main__":
    main()
