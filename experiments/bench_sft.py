"""Training throughput of the Alignment Tasks SFT (stage 3) for any config, side by side over variants.

Builds the model and DataModule exactly as ``lightning fit --config ...`` would, runs ``--warmup`` untimed and
``--steps`` timed optimiser steps per variant (no validation, checkpointing or logging), and prints one line
per variant: seconds per step, prompts (samples)/s, real (non-pad) token columns/s, the padding share of the
batches, peak accelerator memory, and each variant's prompts/s relative to the first one (packed rows hold
several prompts in fewer columns, so prompts/s is the comparable throughput).

    # CPU: trie softmax vs the vocabulary-wide LM loss on the tiny Llama of the Industrial run
    python experiments/bench_sft.py --config configs/industrial/llm.yaml \\
        --variant= --variant=--model.init_args.code_softmax=vocabulary
    # CPU: prefix-tree packing of each prefix's samples (1 prefix / 8 prefixes of a user per row) vs none
    python experiments/bench_sft.py --config configs/industrial/llm.yaml --variant= \
        --variant="--data.init_args.pack_prompts=1 --data.init_args.batch_size=32" \
        --variant="--data.init_args.pack_prompts=8 --data.init_args.batch_size=8"
    # GPU: bf16 LoRA on a 1B-parameter Llama shape (random weights), length grouping off vs on
    python experiments/bench_sft.py --config configs/industrial/llm.yaml --config configs/trainer/gpu.yaml \\
        --set=--model.init_args.lora=true ... --variant=--data.init_args.group_by_length=false --variant=

Every ``--set=`` / ``--variant=`` value is a LightningCLI argument (write them with ``=``: they start with ``--``);
``--variant=`` alone is the config unchanged.
"""

from __future__ import annotations

import argparse
import json
import time

import lightning as L
import torch

from lightning_modules.cli import build_cli


class StepTimer(L.Callback):
    """Wall time, prompts and tokens of ``steps`` optimiser steps after ``warmup`` (synchronising on CUDA).

    Reads the device and its peak memory while training runs: Lightning moves the model back to the CPU at the end
    of fit. With ``profile`` > 0, that many further steps run under ``torch.profiler`` and its table is printed.
    """

    def __init__(self, warmup: int, steps: int, profile: int = 0) -> None:
        self.warmup, self.last, self.profile = warmup, warmup + steps - 1, profile
        self.start = self.seconds = None
        self.steps = self.prompts = self.tokens = self.padded = 0
        self.device, self.peak_gib, self.profiler = "cpu", float("nan"), None

    @staticmethod
    def _sync(module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self._sync(pl_module)
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            self.start = time.perf_counter()
        if batch_idx == self.last + 1 and self.profile:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if pl_module.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.warmup <= batch_idx <= self.last:
            self.steps += 1
            self.prompts += len(batch["task"])  # samples (a packed row holds several)
            if batch["input_ids"].numel() == 0:  # every sample of the batch was over max_length
                pass
            elif "position_ids" in batch:  # packed prefix trees, right-padded: a row ends after its last position > 0
                positive = batch["position_ids"] > 0
                lengths = torch.where(positive.any(1), positive.shape[1] - positive.flip(1).int().argmax(1), 1)
                self.tokens += int(lengths.sum())
            else:
                self.tokens += int(batch["attention_mask"].sum())
            self.padded += batch["input_ids"].numel()
        if batch_idx == self.last:
            self._sync(pl_module)
            self.seconds = time.perf_counter() - self.start
            device = pl_module.device
            if device.type == "cuda":
                self.device = torch.cuda.get_device_name(device)
                self.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30

    def on_train_end(self, trainer, pl_module) -> None:
        if self.profiler is not None:
            self._sync(pl_module)
            self.profiler.__exit__(None, None, None)
            key = "self_cuda_time_total" if self.device != "cpu" else "self_cpu_time_total"
            print(self.profiler.key_averages().table(sort_by=key, row_limit=20), flush=True)


def run_variant(configs: list[str], overrides: list[str], warmup: int, steps: int, profile: int) -> dict:
    args = [arg for config in configs for arg in ("--config", config)]
    args += [
        f"--trainer.max_steps={warmup + steps + profile}",
        "--trainer.limit_val_batches=0",
        "--trainer.callbacks=[]",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.default_root_dir=runs/bench_sft",
        "--test_after_fit=false",
        *overrides,
    ]
    cli = build_cli(args, run=False)
    timer = StepTimer(warmup, steps, profile)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if timer.seconds is None:
        raise SystemExit(f"too few steps: the epoch is shorter than --warmup {warmup} + --steps {steps}")
    return {
        "s_per_step": timer.seconds / timer.steps,
        "prompts_per_s": timer.prompts / timer.seconds,
        "tokens_per_s": timer.tokens / timer.seconds,
        "padding": 1.0 - timer.tokens / timer.padded,
        "peak_gib": timer.peak_gib,
        "device": timer.device,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, help="stacked like lightning's --config")
    parser.add_argument("--set", action="append", default=[], help="a CLI override applied to every variant")
    parser.add_argument("--variant", action="append", default=None, help="space-separated overrides of one variant")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--profile", type=int, default=0, help="profile this many steps after the timed ones")
    args = parser.parse_args()
    variants = args.variant if args.variant is not None else [""]
    results = []
    for variant in variants:
        result = run_variant(args.config, [*args.set, *variant.split()], args.warmup, args.steps, args.profile)
        result["variant"] = variant or "(config)"
        results.append(result)
        print("BENCH_SFT " + json.dumps(result), flush=True)
    base = results[0]["prompts_per_s"]  # work done: packing changes the tokens a prompt costs
    print(
        f"{'variant':58s} {'s/step':>8s} {'prompts/s':>10s} {'tokens/s':>10s} {'padding':>8s} {'peak GiB':>9s} "
        f"{'x first':>8s}"
    )
    for r in results:
        print(
            f"{r['variant'][:58]:58s} {r['s_per_step']:8.3f} {r['prompts_per_s']:10.1f} {r['tokens_per_s']:10.0f} "
            f"{r['padding']:8.1%} {r['peak_gib']:9.2f} {r['prompts_per_s'] / base:8.2f}"
        )


if __name__ == "__main__":
    main()
