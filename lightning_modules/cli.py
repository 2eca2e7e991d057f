"""The ``lightning`` / ``semconv`` command: one LightningCLI for every stage.

Any LightningModule / LightningDataModule is selectable by ``class_path`` (subclass mode), configs use
OmegaConf interpolation, and several ``--config`` files stack (trainer, logger and strategy pieces live in
``configs/trainer``, ``configs/logger`` and ``configs/strategy``). ``fit`` with ``test_after_fit: true``
tests the best checkpoint when training ends, so one command trains, evaluates and prints the metrics.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import sys

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from datamodules.errors import SemConvError

PROJECT_LOGGERS = ("datamodules", "lightning_modules", "callbacks")
log = logging.getLogger(__name__)
_MODEL_FLAG = re.compile(r"--model\.(?:init_args\.)?([A-Za-z_]\w*)")


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(levelname)s %(name)s] %(message)s"))
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class SemConvCLI(LightningCLI):
    """LightningCLI with a ``test_after_fit`` switch; command-line model flags win over ``--ckpt_path`` hparams."""

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        self._command_line = [] if isinstance(args, dict) else list(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the model arguments with the checkpoint's hyperparameters, silently dropping e.g.
        ``lightning test --ckpt_path ... --model.init_args.mask_history true``: re-apply such explicit flags."""
        subcommand = self.config.get("subcommand")
        given = copy.deepcopy(self.config[subcommand].get("model")) if subcommand else None
        super()._parse_ckpt_path()
        if given is None or given.get("init_args") is None:
            return
        model = self.config[subcommand]["model"]
        for key in sorted({match.group(1) for arg in self._command_line if (match := _MODEL_FLAG.match(arg))}):
            if key in given.init_args and model.init_args.get(key) != given.init_args[key]:
                log.warning(
                    "--model.init_args.%s=%r from the command line replaces the checkpoint's %r",
                    key,
                    given.init_args[key],
                    model.init_args.get(key),
                )
                model.init_args[key] = given.init_args[key]

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After `fit`, run `test` on the best checkpoint (last weights if none was saved).",
        )

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        if self.trainer.interrupted:
            return
        checkpoint = self.trainer.checkpoint_callback
        ckpt_path = "best" if checkpoint is not None and getattr(checkpoint, "best_model_path", "") else None
        if ckpt_path and getattr(self.trainer.strategy, "zero_stage_3", False):
            # DeepSpeed cannot load a ZeRO-3 checkpoint into the optimizer-less engine that `test` builds
            # (AttributeError '_restore_from_bit16_weights', deepspeedai/DeepSpeed#7272; seen with 0.19.8).
            rank_zero_warn(
                "DeepSpeed ZeRO-3: testing the weights fit ended with, not the best checkpoint (DeepSpeed cannot "
                "reload "
                "a ZeRO-3 checkpoint for test). To test the best one, consolidate it with lightning.pytorch.utilities."
                "deepspeed.convert_zero_checkpoint_to_fp32_state_dict and run `test --ckpt_path <file>` with "
                "--trainer.strategy.init_args.load_full_weights true."
            )
            ckpt_path = None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)


def build_cli(args: list[str] | None = None, run: bool = True) -> SemConvCLI:
    """Parse ``args`` (``sys.argv`` when None), instantiate, and run the subcommand when ``run``."""
    # W&B stays offline unless the user opts in (WANDB_MODE=online); nothing leaves the machine by default. A run
    # that `wandb agent` started (it sets WANDB_SWEEP_ID) has opted in: offline, it would never report to its sweep.
    if not os.environ.get("WANDB_SWEEP_ID"):
        os.environ.setdefault("WANDB_MODE", "offline")
    # Configs write ${trainer.default_root_dir}; under a subcommand the merged config is nested (fit.trainer...),
    # so absolute interpolation paths must be read relative to the subcommand's root.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    _configure_logging()
    return SemConvCLI(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # "omegaconf+" resolves interpolation after all stacked --config files are merged, so a logger piece can
        # refer to ${trainer.default_root_dir} set by the model config (plain "omegaconf" resolves per file).
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True},
        seed_everything_default=42,
        args=args,
        run=run,
    )


DEBUG_FLAG = "--debug"
DEBUG_ENV = "SEMCONV_DEBUG"


def project_error(error: BaseException) -> SemConvError | None:
    """The :class:`SemConvError` behind ``error``, if any: jsonargparse re-raises a constructor's error as its own
    ``ValueError`` (``raise ... from``), Lightning may wrap hook errors, so the ``__cause__``/``__context__`` chain
    is followed."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, SemConvError):
            return current
        pending += [linked for linked in (current.__cause__, current.__context__) if linked is not None]
    return None


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lightning`` and ``semconv``; returns None so the console script exits with 0.

    The project's own errors (bad data, bad config, mismatched artifacts: :class:`SemConvError`) are printed as one
    message and exit with status 2; ``--debug`` or ``SEMCONV_DEBUG=1`` re-raises them with the traceback.

    Args:
        args: command-line arguments (``sys.argv[1:]`` when None).
    """
    given = list(sys.argv[1:] if args is None else args)
    debug = DEBUG_FLAG in given or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if DEBUG_FLAG in given:
        given = [arg for arg in given if arg != DEBUG_FLAG]
        if args is None:  # the DDP launcher re-runs sys.argv: its worker processes get the flag from the environment
            sys.argv[1:] = given
            os.environ[DEBUG_ENV] = "1"
    try:
        if given[:1] == ["serve"]:  # `semconv serve --store URL`: the online lookup service, not a LightningCLI run
            from lightning_modules.service import serve_main

            status = serve_main(given[1:])
            if status:
                raise SystemExit(status)
            return
        if given[:1] == ["pipeline"]:  # `semconv pipeline --config ...`: every stage in order, then one table
            from lightning_modules.pipeline import pipeline_main

            status = pipeline_main(given[1:])
            if status:
                raise SystemExit(status)
            return
        build_cli(None if args is None else given)
    except Exception as error:
        cause = None if debug else project_error(error)
        if cause is None:
            raise
        print(f"error: {cause}\n(pass {DEBUG_FLAG} or set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
