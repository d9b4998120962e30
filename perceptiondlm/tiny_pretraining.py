"""Stand-ins for the pretraining the real backbones arrive with, at the tiny world's size: SigLIP2's (a vision
tower whose features say what is in each patch and what each object is) and LLaDA's (a language model that can
read a context and, here, the vectors a vision-language model puts in its image and RoI positions). The tiny
world's build (`perceptiondlm.tiny_world`) runs both before the five training stages.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import SiglipModel

from perceptiondlm.data.synthetic import (
    ATTRIBUTES,
    VALUES,
    ShapeObject,
    attribute_words,
    make_scene,
    object_caption,
    scene_conversations,
)
from perceptiondlm.models.regions import region_attention_mask
from perceptiondlm.processing.prompts import region_messages, render_chat

logger = logging.getLogger(__name__)

#: The tiny backbones' sizes (the real ones: LLaDA-8B, SigLIP2 so400m), chosen to train on 2 CPU cores in minutes.
TINY_LLADA = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5)
TINY_SIGLIP_VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                          image_size=64, patch_size=8)
TINY_SIGLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        vocab_size=64, max_position_embeddings=16, pad_token_id=1, bos_token_id=2, eos_token_id=3)


# ------------------------------------------------------------------------------------------------ vision
def patch_labels(scene: Any, patch: int) -> torch.Tensor:
    """Per patch (row-major): for each attribute, the index of the value of the object covering the patch centre
    (or an extra "background" class), then the patch's own 3 x 3 grid cell: (N, len(ATTRIBUTES) + 1) long."""
    size = scene.image.shape[0]
    centres = torch.arange(patch // 2, size, patch)
    labels = []
    for y in centres.tolist():
        for x in centres.tolist():
            owner = next((o for o, m in zip(scene.objects, scene.masks, strict=True) if m[y, x]), None)
            row = [VALUES[a].index(getattr(owner, a)) if owner else len(VALUES[a]) for a in ATTRIBUTES]
            labels.append([*row, 3 * (3 * y // size) + 3 * x // size])
    return torch.tensor(labels)


# How strongly each label shows in the distilled features: appearance first, as in a real encoder. Shape is
# weighted up because it is the hardest to learn (no single 8-px patch shows an outline).
CODE_WEIGHTS = {"colour": 3.0, "shape": 4.0, "texture": 2.0, "size": 1.0, "position": 2.0, "cell": 0.5}


def attribute_codes(dim: int, seed: int) -> list[torch.Tensor]:
    """Fixed random codes, one table per label of `patch_labels`: (values + 1, dim) with rows of unit norm."""
    generator = torch.Generator().manual_seed(seed)
    tables = []
    for name in (*ATTRIBUTES, "cell"):
        rows = len(VALUES[name]) + 1 if name != "cell" else 9
        table = F.normalize(torch.randn(rows, dim, generator=generator), dim=-1) * CODE_WEIGHTS[name]
        if name != "cell":
            table[-1] = 0.0  # background: no object code
        tables.append(table)
    return tables


def coverage(mask: np.ndarray, patch: int) -> torch.Tensor:
    """Share of each patch (row-major) that a (S, S) mask covers: (N,) float."""
    side = mask.shape[0] // patch
    return torch.from_numpy(mask.reshape(side, patch, side, patch).mean((1, 3))).flatten().float()


def object_labels(scene: Any, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each object's patch coverage (`coverage`) and attribute value indices: (objects, N) float and
    (objects, len(ATTRIBUTES)) long; objects that cover no pixel of any patch are left out."""
    weights = torch.stack([coverage(m, patch) for m in scene.masks])
    values = torch.tensor([[VALUES[a].index(getattr(o, a)) for a in ATTRIBUTES] for o in scene.objects])
    keep = weights.sum(-1) > 0
    return weights[keep], values[keep]


def pool_objects(features: torch.Tensor, weights: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """Each object's features averaged over its patches, weighted by how much of each patch it covers:
    features (B, N, D), weights (O, N), image_index (O,) -> (O, D). Shape shows in an object's outline, which no
    single patch sees; pooling as the RoI tokens do lets the tower spread it over the object's patches."""
    return torch.einsum("on,ond->od", weights / weights.sum(-1, keepdim=True), features[image_index])


class SceneBatches(torch.utils.data.Dataset):
    """Batch `i` of the vision stand-in's scenes (world `seed`, never a training or benchmark split's seed):
    pixels (B, 3, S, S), patch labels (B, N, A + 1), and per object its coverage (O, N), attribute values (O, A)
    and image index (O,). A Dataset so that a DataLoader worker draws scenes while the tower trains."""

    def __init__(self, steps: int, batch: int, seed: int, patch: int) -> None:
        self.steps, self.batch, self.seed, self.patch = steps, batch, seed, patch

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from perceptiondlm.processing.tiling import normalize_tiles

        scenes = [make_scene(self.seed, i * self.batch + j) for j in range(self.batch)]
        objects = [object_labels(s, self.patch) for s in scenes]
        return {"pixels": normalize_tiles([Image.fromarray(s.image) for s in scenes]),
                "labels": torch.stack([patch_labels(s, self.patch) for s in scenes]),
                "weights": torch.cat([w for w, _ in objects]), "values": torch.cat([v for _, v in objects]),
                "image_index": torch.cat([torch.full((len(v),), b) for b, (_, v) in enumerate(objects)])}


def pretrain_vision_tower(siglip_dir: Path, steps: int = 2400, batch: int = 32, seed: int = 0,
                          object_weight: float = 4.0, workers: int = 1) -> None:
    """Stands in for SigLIP2's pretraining, which leaves a tower whose patch features are dominated by what is in
    the patch and whose pooled features name the object. Two targets, read at the layer the VLM uses
    (`vision_select_layer` -2): each patch's features are distilled towards an attribute code (the sum of a fixed
    random vector per attribute of the object under the patch centre, and one for the patch's grid cell), and each
    object's mask-pooled features (`pool_objects`) must name its attributes through linear heads (cross-entropy,
    weight `object_weight`; the heads are thrown away). A random tower's features are dominated by the position
    embedding (73 % of the variance of the RoI tokens, colour 1 %): the VLM then learns where regions are but not
    what they look like. The SigLIP checkpoint is rewritten in place."""
    from perceptiondlm.models.vision import encode_tiles

    torch.manual_seed(seed)
    siglip = SiglipModel.from_pretrained(siglip_dir)
    tower, patch = siglip.vision_model, siglip.config.vision_config.patch_size
    width = siglip.config.vision_config.hidden_size
    codes = attribute_codes(width, seed)
    heads = torch.nn.ModuleList(torch.nn.Linear(width, len(VALUES[a])) for a in ATTRIBUTES)
    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    batches = torch.utils.data.DataLoader(SceneBatches(steps, batch, seed + 7919, patch), batch_size=None,
                                          num_workers=workers)
    for step, data in enumerate(batches):
        target = sum(code[data["labels"][..., a]] for a, code in enumerate(codes))  # (B, N, D)
        features = encode_tiles(tower, data["pixels"], None, -2)  # (B, N, D)
        loss = F.mse_loss(features, target)
        if object_weight:
            pooled = pool_objects(features, data["weights"], data["image_index"])  # (O, D)
            loss = loss + object_weight * sum(F.cross_entropy(head(pooled), data["values"][:, a])
                                              for a, head in enumerate(heads)) / len(heads)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("vision pretraining step %d/%d: loss %.4f", step, steps, loss.item())
    siglip.save_pretrained(siglip_dir)


def probe_vision_tower(siglip_dir: Path, train_images: int = 1000, test_images: int = 150,
                       seed: int = 0) -> dict[str, float]:
    """Linear probes of the tower's mask-pooled features (`pool_objects`, standardised): per attribute, a
    logistic regression fitted on the objects of `train_images` scenes and scored on those of `test_images` other
    scenes (both worlds unseen in pretraining). Returns the held-out accuracy of each attribute."""
    from perceptiondlm.models.vision import encode_tiles

    siglip = SiglipModel.from_pretrained(siglip_dir).eval()
    tower, patch = siglip.vision_model, siglip.config.vision_config.patch_size

    def pooled(world: int, images: int) -> tuple[torch.Tensor, torch.Tensor]:
        batches = SceneBatches(-(-images // 50), 50, world, patch)
        with torch.no_grad():
            parts = [(pool_objects(encode_tiles(tower, b["pixels"], None, -2), b["weights"], b["image_index"]),
                      b["values"]) for b in (batches[i] for i in range(len(batches)))]
        return torch.cat([f for f, _ in parts]), torch.cat([v for _, v in parts])

    torch.manual_seed(seed)
    train_x, train_y = pooled(seed + 104_723, train_images)
    test_x, test_y = pooled(seed + 104_711, test_images)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std

    def fit(labels: torch.Tensor, classes: int) -> torch.nn.Linear:
        probe = torch.nn.Linear(train_x.shape[1], classes)
        optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=300)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(probe(train_x), labels) + 1e-3 * probe.weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return probe

    accuracy = {}
    for a, name in enumerate(ATTRIBUTES):
        probe = fit(train_y[:, a], len(VALUES[name]))
        with torch.no_grad():
            accuracy[name] = round(float((probe(test_x).argmax(-1) == test_y[:, a]).float().mean()), 4)
    return accuracy


# ------------------------------------------------------------------------------------------------ language
class LayoutTexts:
    """Text-only samples in a vision-language layout: the processor's tokens and attention, with the positions
    that hold image features in the real model filled with sums of word embeddings instead (what a grounded image
    or RoI token is to the LM: one vector that carries the words of what it shows). A real LLM arrives able to read
    such vectors; the tiny LLaDA learns it here, so the VLM stages only have to map image features onto them.
    Subclasses give `_sample` -> (ids, labels, fills): each fill is (positions (L,) bool, weights (P, O), words
    (O lists of token ids)), and the P filled positions get `weights @ word sums`."""

    def __init__(self, tokenizer: Any, seed: int = 0, **processor_options: Any) -> None:
        from perceptiondlm.processing.processor import PerceptionDLMProcessor

        self.processor = PerceptionDLMProcessor(  # the tiny stages' processor (configs/tiny), for its layout
            tokenizer, image_size=TINY_SIGLIP_VISION["image_size"], patch_size=TINY_SIGLIP_VISION["patch_size"],
            downsample_ratio=1.0, **processor_options)
        self.tokenizer, self.special = tokenizer, self.processor.special_tokens
        self.generator = torch.Generator().manual_seed(seed)
        self.seed, self.drawn = seed, 0

    def word_ids(self, obj: ShapeObject) -> list[int]:
        return [i for w in attribute_words(obj) for i in self.tokenizer(" " + w, add_special_tokens=False).input_ids]

    def _sample(self) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, list[list[int]]]]]:
        raise NotImplementedError

    def _layout(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        return attention

    def batch(self, size: int, embeddings: torch.nn.Embedding) -> dict[str, torch.Tensor]:
        """`size` padded samples: ids and labels (B, L), input embeddings (B, L, D), the attention layout."""
        samples = [self._sample() for _ in range(size)]
        length = max(len(ids) for ids, _, _ in samples)
        ids = torch.full((size, length), self.special.eot)
        labels = torch.full((size, length), -100)
        attention = torch.zeros(size, length, dtype=torch.long)
        for b, (row, row_labels, _) in enumerate(samples):
            ids[b, : len(row)], labels[b, : len(row)], attention[b, : len(row)] = row, row_labels, 1
        embeds = embeddings(ids)
        for b, (row, _, fills) in enumerate(samples):
            for positions, weights, words in fills:
                sums = torch.stack([embeddings(torch.tensor(w)).sum(0) for w in words])  # (O, D)
                where = torch.zeros(length, dtype=torch.bool)
                where[: len(row)] = positions
                embeds[b, where] = weights @ sums
        return {"ids": ids, "labels": labels, "embeds": embeds, "layout": self._layout(ids, attention)}


class RegionLayoutTexts(LayoutTexts):
    """The region-captioning conversation and its region attention layout, without an image, each region's RoI
    span holding the sum of its attribute-word embeddings (random init: size and texture read within 200 steps,
    shape 0.83 at 300)."""

    def __init__(self, tokenizer: Any, roi_output_size: int = 4, caption_length: int = 16, max_regions: int = 6,
                 seed: int = 0) -> None:
        super().__init__(tokenizer, seed, prompt_numbers=max_regions, roi_output_size=roi_output_size)
        self.caption_length, self.max_regions = caption_length, max_regions

    def _pick(self, values: tuple[str, ...]) -> str:
        return values[int(torch.randint(len(values), (1,), generator=self.generator))]

    def _object(self) -> ShapeObject:
        covered = bool(torch.rand(1, generator=self.generator) < 0.3)
        return ShapeObject(shape=self._pick(VALUES["shape"]), colour=self._pick(VALUES["colour"]),
                           size=self._pick(VALUES["size"]), texture=self._pick(VALUES["texture"]),
                           position=self._pick(VALUES["position"]), centre=(0.0, 0.0), radius=1.0,
                           visible_fraction=0.6 if covered else 1.0)

    def _sample(self):
        """The conversation as the processor encodes it for training, without the image positions (RoI spans
        stay reserved-token ids), and each region's span as a fill."""
        k = int(torch.randint(1, self.max_regions + 1, (1,), generator=self.generator))
        objects = [self._object() for _ in range(k)]
        captions = [self.processor.pad_caption(object_caption(o), self.caption_length) for o in objects]
        text, spans = render_chat(region_messages(k, captions=captions))
        ids, labels = self.processor.encode_text(text, spans, [1], k, self.processor.roi_tokens((1, 1)))
        text_only = ids != self.special.image_context
        ids, labels = ids[text_only], labels[text_only]
        fills = [(ids == self.special.reserved[i], torch.ones(int((ids == self.special.reserved[i]).sum()), 1),
                  [self.word_ids(o)]) for i, o in enumerate(objects)]
        return ids, labels, fills

    def _layout(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        reserved = torch.tensor(self.special.reserved[: self.max_regions])
        slots = torch.tensor(self.special.caption_slots[: self.max_regions])
        return region_attention_mask(ids, reserved, slots, attention, prefix_attends_answers=False)


class ImageLayoutTexts(LayoutTexts):
    """The Base stages' image-level conversations (scene captions and questions, `scene_conversations`) of real
    tiny-world scenes, each of the image's patch positions holding the coverage-weighted sum of the attribute-word
    embeddings of the objects under the patch (the background: nothing)."""

    def _sample(self):
        index, self.drawn = self.drawn, self.drawn + 1
        scene = make_scene(self.seed + 104_729, index)
        rng = np.random.default_rng([self.seed, index, 5])
        conversations = scene_conversations(scene, rng, 3)
        conversation = conversations[int(rng.integers(len(conversations)))]
        messages = [{"role": "user" if turn["from"] == "human" else "assistant", "content": turn["value"]}
                    for turn in conversation]
        encoded = self.processor.chat_examples([Image.fromarray(scene.image)], [messages])
        ids, labels = encoded["input_ids"][0], encoded["labels"][0]
        patch = self.processor.patch_size
        weights = torch.stack([coverage(m, patch) for m in scene.masks], dim=1)  # (N, O)
        return ids, labels, [(ids == self.special.image_context, weights, [self.word_ids(o) for o in scene.objects])]


def pretrain_language_model(llada_dir: Path, texts: list[str], steps: int = 1200, batch: int = 32,
                            seed: int = 0) -> None:
    """Stands in for LLaDA's pretraining: masked-diffusion training of the tiny LLaDA on the tiny world's text
    (captions, questions, answers), on `RegionLayoutTexts` and on `ImageLayoutTexts`, so that the VLM stages start,
    as the real recipe does, from a model that knows the language, can read a region's span and an image's patches,
    and only has to learn to see. The region layout comes first (3/8 of the steps), then the three kinds take
    turns: a model trained on text first did not learn to read the span in 2,000 further steps, while a fresh one
    reads size and texture after 200. The checkpoint is rewritten in place."""
    from transformers import PreTrainedTokenizerFast

    from perceptiondlm.diffusion.noise import diffusion_loss, mask_tokens, noise_inputs, sample_noise_levels
    from perceptiondlm.models.llada import LLaDAModelLM
    from perceptiondlm.processing.tokens import SpecialTokens

    torch.manual_seed(seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(llada_dir)
    model = LLaDAModelLM.from_pretrained(llada_dir, dtype=torch.float32).train()
    special = SpecialTokens.from_tokenizer(tokenizer)
    encoded = [ids for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if ids]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    embeddings = model.get_input_embeddings()
    generator = torch.Generator().manual_seed(seed)
    layouts = [RegionLayoutTexts(tokenizer, seed=seed), ImageLayoutTexts(tokenizer, seed=seed)]
    for step in range(steps):
        kind = 0 if step < steps * 3 // 8 else step % 3  # region layout first, then region / image / text
        if kind < 2:
            inputs = layouts[kind].batch(batch, embeddings)
            ids, eligible, embeds, layout = inputs["ids"], inputs["labels"] != -100, inputs["embeds"], inputs["layout"]
        else:
            rows = [encoded[i] for i in torch.randint(len(encoded), (batch,), generator=generator).tolist()]
            length = max(map(len, rows))
            ids = torch.tensor([r + [special.eot] * (length - len(r)) for r in rows])  # eot-padded, as captions
            eligible, embeds, layout = torch.ones_like(ids, dtype=torch.bool), embeddings(ids), None
        p = sample_noise_levels(len(ids))
        masked = mask_tokens(eligible, p)
        noised = noise_inputs(embeds, masked, embeddings.weight[special.mask])
        logits = model(inputs_embeds=noised, attention_mask=layout, logits_mask=masked).logits
        loss = diffusion_loss(logits, ids[masked], masked, p, eligible)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("language pretraining step %d (%s): loss %.3f", step, ("region", "image", "text")[kind],
                        loss.item())
    model.save_pretrained(llada_dir)
