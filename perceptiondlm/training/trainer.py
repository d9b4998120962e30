"""Training: a transformers `Trainer` with per-module learning rates and length-grouped batches, and
`run_training`, which composes the model, processor, dataset and collator from the four config sections.

The loss is the model's own masked-diffusion loss (spec §3.7); DeepSpeed, gradient accumulation, logging,
checkpointing and resuming are the Trainer's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, set_seed
from transformers.trainer_utils import get_last_checkpoint

from perceptiondlm.training.model_setup import PARTS, build_model, build_processor, merge_lora

logger = logging.getLogger(__name__)


def part_of(name: str) -> str:
    """The model part a parameter belongs to (its name's first segment), "other" otherwise."""
    head = name.split(".", 1)[0]
    return head if head in PARTS else "other"


class PerceptionDLMTrainer(Trainer):
    """`Trainer` with one optimizer group per (model part, weight decay): each part may have its own
    learning rate (`<part>_lr` training arguments, default `learning_rate`); biases and norms get no decay.
    With `length_grouping`, batches hold sequences of similar length (less padding)."""

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                groups.setdefault((part_of(name), name in decay), []).append(param)
        param_groups = []
        for (part, decays), params in sorted(groups.items()):
            lr = getattr(self.args, f"{part}_lr", None) or self.args.learning_rate
            param_groups.append({"params": params, "lr": lr, "weight_decay": self.args.weight_decay if decays else 0.0})
            logger.info("optimizer group %s (%s): %d tensors, lr %g", part, "decay" if decays else "no decay",
                        len(params), lr)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        # Examples are raw (image, masks, captions) records that the collator turns into model inputs, so the
        # Trainer must not drop their keys as "unused by forward".
        return data_collator

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if getattr(self.args, "length_grouping", False) and hasattr(dataset, "lengths"):
            from perceptiondlm.data.grouping import LengthGroupedSampler

            # Lengths are read at every epoch: the region groups and num_samples subsets change with it.
            return LengthGroupedSampler(lambda: dataset.lengths, self.args.train_batch_size, seed=self.args.seed,
                                        world_size=self.args.world_size)
        return super()._get_train_sampler(train_dataset)


def run_training(config: Any) -> Path:
    """Runs one training stage described by a loaded config (`training.config.load_config`); returns the
    output directory, which then holds a loadable checkpoint (weights, config, tokenizer and processor files).

    An output directory that already holds `checkpoint-*` folders continues that run (same data order,
    optimizer and scheduler state, random state) unless `TRAINING_CONFIG.resume_from_checkpoint` says
    otherwise.
    """
    from perceptiondlm.data.collate import Collator
    from perceptiondlm.data.datasets import build_train_dataset
    from perceptiondlm.training.config import save_config

    args = config.training
    # Set up the device and process group now: under ZeRO-3, loading the model already partitions it.
    logger.info("process %d of %d on %s", args.process_index, args.world_size, args.device)
    if args.deepspeed and args.world_size > 1:
        import deepspeed

        deepspeed.init_distributed()  # ZeRO-3's partitioned init reads the world size from DeepSpeed's own comm
    set_seed(args.seed)
    processor = build_processor(config.model, config.processor)
    model = build_model(config.model, processor)
    prompt_numbers = model.config.prompt_numbers if model.config.has_regions else None
    dataset = build_train_dataset(config.data, processor, model_type=config.model.model_type,
                                  prompt_numbers=prompt_numbers, seed=args.seed)
    output = Path(args.output_dir)
    if args.process_index == 0:
        save_config(config, output)
    collator = Collator(processor, config.data.question, config.data.caption_length, config.data.answer_length)
    trainer = PerceptionDLMTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                   processing_class=processor)
    resume = args.resume_from_checkpoint
    if resume is None and output.is_dir() and get_last_checkpoint(str(output)):
        resume = True
        logger.info("continuing the run in %s from %s", output, get_last_checkpoint(str(output)))
    trainer.train(resume_from_checkpoint=resume)
    if config.model.lora:
        merge_lora(trainer.model)
    trainer.save_model(str(output))
    if args.process_index == 0:
        processor.save_pretrained(output)
    _finish_distributed()
    return output


def _finish_distributed() -> None:
    # DeepSpeed ZeRO-3 can abort at interpreter exit unless every rank meets here first (environment notes).
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
