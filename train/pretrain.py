"""`zoo train` / `python -m train.pretrain` / `torchrun --nproc-per-node N -m train.pretrain`: train a model.

Exit codes: 0 done; 2 bad input (a flag, a file, a run folder in use); 3 training diverged (nothing
non-finite was applied or saved); 4 a checkpoint could not be written (full disk...); 130 Ctrl-C and
143 SIGTERM (a checkpoint of the last step was saved, unless the signal came before the first step).
Every error is one line on stderr, without a traceback.
"""

from __future__ import annotations

import signal
import sys
import threading

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_WRITE_FAILED = 2, 3, 4


class Terminated(BaseException):
    """SIGTERM arrived before the training loop took over the signal (nothing to save yet)."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, train, print the summary; the exit code says how it went (see the module docstring)."""
    prog = "zoo train" if argv is not None else "python -m train.pretrain"
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    trainer = None
    try:
        # Imported here, inside the try: a Ctrl-C while torch loads is a startup interrupt like any other.
        import torch.distributed as dist

        from train.checkpoint import CheckpointWriteError
        from train.config import parse_args
        from train.run_folder import RunFolderLocked
        from train.trainer import Trainer, TrainingDiverged

        try:
            cfg = parse_args(argv, prog=prog)
            trainer = Trainer(cfg)
            summary = trainer.run()
        except TrainingDiverged as err:
            print(f"{prog}: training stopped: {err}", file=sys.stderr)
            return EXIT_DIVERGED
        except CheckpointWriteError as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            return EXIT_WRITE_FAILED
        except (ValueError, FileNotFoundError, FileExistsError, RunFolderLocked) as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except KeyboardInterrupt:
        return _interrupted(prog, trainer, signal.SIGINT)
    except Terminated:
        return _interrupted(prog, trainer, signal.SIGTERM)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if summary.get("interrupted"):
        return 128 + summary.get("signal", signal.SIGINT)
    if "final" in summary:
        keys = ("steps", "tokens", "loss", "val_loss", "val_ppl", "tokens_per_s", "mfu", "final")
        print("done: " + ", ".join(f"{k}={summary[k]:.4g}" if isinstance(summary.get(k), float)
                                   else f"{k}={summary.get(k)}" for k in keys))
    return 0


def _interrupted(prog: str, trainer, signum: int) -> int:
    """One line for a Ctrl-C / SIGTERM that aborted startup (or a second one that aborted a save); 128 + signum."""
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    last = getattr(trainer, "last_checkpoint", None)
    if trainer is None or not getattr(trainer, "started", False):
        print(f"{prog}: {name} before the first step: stopped, nothing was saved", file=sys.stderr)
    else:
        saved = f"the last checkpoint is {last}" if last else "no checkpoint was saved"
        print(f"{prog}: aborted by a second {name}: {saved}", file=sys.stderr)
    return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
