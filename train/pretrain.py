"""`zoo train` / `python -m train.pretrain` / `torchrun --nproc-per-node N -m train.pretrain`: train a model.

Exit codes: 0 done; 2 bad input (a flag, a file, a run folder in use); 3 training diverged (nothing
non-finite was applied or saved); 4 a checkpoint could not be written (full disk...); 130 Ctrl-C and
143 SIGTERM (a checkpoint of the last step was saved, unless the signal came before the first step).
Every error is one line on stderr, without a traceback.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_WRITE_FAILED = 2, 3, 4


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, train, print the summary; the exit code says how it went (see the module docstring)."""
    run: dict = {}  # the Trainer, once there is one: what the signal handlers report
    code = _main(argv, run)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A rank of a multi-process run ends here, without tearing its objects down: freeing the DDP model
        # destroys the gloo process group, whose destructor joins a worker thread that may be waiting for the
        # GIL the freeing thread holds (a deadlock seen once in a few runs under load). Everything is written
        # and the process group is destroyed already; only the output streams need flushing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str] | None, run: dict) -> int:
    prog = "zoo train" if argv is not None else "python -m train.pretrain"
    previous = _stop_outside_the_loop(prog, run)
    try:
        importlib.import_module("zoo")  # before torch loads: zoo/__init__.py sets torch's CPU allocator default
        import torch.distributed as dist

        from train.checkpoint import CheckpointWriteError
        from train.config import parse_args
        from train.run_folder import RunFolderLocked
        from train.trainer import Trainer, TrainingDiverged

        try:
            cfg = parse_args(argv, prog=prog)
            run["trainer"] = Trainer(cfg)
            summary = run["trainer"].run()
        except TrainingDiverged as err:
            print(f"{prog}: training stopped: {err}", file=sys.stderr)
            return EXIT_DIVERGED
        except CheckpointWriteError as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            return EXIT_WRITE_FAILED
        except (ValueError, FileNotFoundError, FileExistsError, RunFolderLocked) as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:  # a second Ctrl-C in the loop (the first one saves and returns)
            print(f"{prog}: Ctrl-C {_where(run.get('trainer'), again=True)}", file=sys.stderr)
            return 128 + signal.SIGINT
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if summary.get("interrupted"):
        return 128 + summary.get("signal", signal.SIGINT)
    if "final" in summary:
        keys = ("steps", "tokens", "loss", "val_loss", "val_ppl", "val_bpb", "tokens_per_s", "mfu", "final")
        print("done: " + ", ".join(f"{k}={summary[k]:.4g}" if isinstance(summary.get(k), float)
                                   else f"{k}={summary.get(k)}" for k in keys if k != "val_bpb" or k in summary))
    return 0


def _stop_outside_the_loop(prog: str, run: dict) -> dict:
    """Handle Ctrl-C / SIGTERM outside the training loop (which takes them over while it runs): one line on
    stderr, exit 128 + signal at once. Nothing is being saved then but the atomic final checkpoint, whose
    temp folder the next start removes; raising instead could land inside an import, which would turn it
    into an ImportError with a traceback. Returns the handlers it replaced (an ignored signal stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum, frame):
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"{prog}: {name} {_where(run.get('trainer'))}", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, stop)
    return previous


def _where(trainer, again: bool = False) -> str:
    """What a stop signal interrupted, and what was saved."""
    if trainer is None or not trainer.started:
        return "before the first step: stopped, nothing was saved"
    if again:
        return f"again: stopped at once; the last checkpoint is {trainer.last_checkpoint or 'none'}"
    return (f"while writing the final checkpoint: stopped; the last resumable checkpoint is "
            f"{trainer.last_checkpoint}, and --resume {trainer.run_dir} writes the final one")


if __name__ == "__main__":
    sys.exit(main())
