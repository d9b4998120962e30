"""Training-step cost of the masked-diffusion loss with `lm_head` only at the noised positions (ours) vs logits at
every position (the reference), on a tiny LLaDA with the real 126k vocabulary.

Each variant runs in its own process so that peak memory (max RSS) is its own; both use the same inputs, seed and
thread count. Output: JSON + a Markdown table with tokens/s and peak memory and their ratios.
Usage: python benchmarks/train_step.py [--quick] [--out benchmarks/results/train_step.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from perceptiondlm.diffusion.noise import diffusion_loss, mask_tokens, noise_inputs, sample_noise_levels
from perceptiondlm.models.configuration import LLaDAConfig
from perceptiondlm.models.llada import LLaDAModelLM

VOCAB = 126464  # LLaDA-8B's embedding rows
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)


def run_variant(masked_only: bool, batch: int, length: int, answer: int, steps: int, queue: mp.Queue) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = LLaDAModelLM(LLaDAConfig(vocab_size=VOCAB, **SHAPE)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 1000, (batch, length))
    eligible = torch.zeros(batch, length, dtype=torch.bool)
    eligible[:, -answer:] = True  # the answer span carries labels
    mask_row = 999
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(steps + 1):  # step 0 warms up
        start = time.perf_counter()
        p = sample_noise_levels(batch)
        masked = mask_tokens(eligible, p)
        embeds = noise_inputs(model.get_input_embeddings()(ids), masked, model.get_input_embeddings().weight[mask_row])
        if masked_only:
            logits = model(inputs_embeds=embeds, logits_mask=masked).logits  # (N, V)
        else:
            logits = model(inputs_embeds=embeds).logits.float()[masked]  # (B, L, V) first, as the reference
        loss = diffusion_loss(logits, ids[masked], masked, p, eligible)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    median = statistics.median(times)
    queue.put({"seconds_per_step": median, "tokens_per_second": batch * length / median,
               "peak_rss_mb": peak_mb, "rss_before_steps_mb": base_rss / 1024})


def measure(masked_only: bool, **shape: int) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=run_variant, args=(masked_only, *shape.values(), queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and a shorter sequence")
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    args = parser.parse_args()
    shape = dict(batch=2, length=256 if args.quick else 1024, answer=64 if args.quick else 256,
                 steps=2 if args.quick else 5)
    results = {"masked_only": measure(True, **shape), "full_logits": measure(False, **shape)}
    ours, reference = results["masked_only"], results["full_logits"]
    report = {
        "setup": {**shape, "vocab": VOCAB, **SHAPE, "torch": torch.__version__, "threads": 2,
                  "machine": platform.processor() or platform.machine()},
        **results,
        "speedup_tokens_per_second": ours["tokens_per_second"] / reference["tokens_per_second"],
        "peak_memory_ratio_full_over_masked": reference["peak_rss_mb"] / ours["peak_rss_mb"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = "\n".join([
        "| logits | tokens/s | s/step | peak RSS (MB) |", "|---|---:|---:|---:|",
        *(f"| {name.replace('_', ' ')} | {r['tokens_per_second']:.0f} | {r['seconds_per_step']:.3f} | "
          f"{r['peak_rss_mb']:.0f} |" for name, r in results.items()),
        "", f"Masked-only logits: {report['speedup_tokens_per_second']:.2f}x the tokens/s, "
        f"{report['peak_memory_ratio_full_over_masked']:.2f}x less peak memory "
        f"(batch {shape['batch']} x {shape['length']} tokens, {shape['answer']} answer tokens each, vocab {VOCAB}).",
    ])
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
