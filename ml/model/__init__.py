"""CoCa from open_clip, configured by JSON files in ml/model/configs/, and the species classifier
that reuses its image encoder (ViT + attention pooler)."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from open_clip.coca_model import CoCa
from torch import nn
from torch.nn import functional as F

CONFIG_DIR = Path(__file__).with_name("configs")


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name: str) -> dict:
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown model config {name!r}; available: {available_configs()}")
    return json.loads(path.read_text())


def build_coca(name: str, vocab_size: int | None = None) -> CoCa:
    """The named CoCa; `vocab_size` overrides the text towers' (see CaptionTokenizer)."""
    config = load_config(name)
    if vocab_size is not None:
        config["text_cfg"]["vocab_size"] = config["multimodal_cfg"]["vocab_size"] = vocab_size
    coca = CoCa(**config)
    # open_clip leaves the decoder's output projection as torch.empty (its init_parameters is broken)
    nn.init.normal_(coca.text_decoder.text_projection, std=coca.text_decoder.width**-0.5)
    # DeepSpeed broadcasts parameters as byte views, which 0-dim tensors can't give: use shape [1].
    coca.logit_scale = nn.Parameter(coca.logit_scale.detach().reshape(1))
    return coca


def load_classifier(path: Path) -> SpeciesClassifier:
    """A whole pickled classifier written by an earlier stage of this pipeline (trusted input)."""
    return torch.load(path, weights_only=False).eval()


class CaptionTokenizer:
    """open_clip's BPE tokenizer (its vocabulary ships with the package) with ids renumbered onto
    the tokens a caption corpus uses. The captions need a few hundred tokens; a 49k-way output
    layer would cost most of the pretraining compute. Order is kept: padding stays 0 and
    end-of-text stays the largest id, as open_clip expects."""

    def __init__(self, context_length: int, corpus: list[str]):
        self.bpe = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
        used = torch.unique(torch.cat([torch.zeros(1, dtype=torch.long), self.bpe(corpus).flatten()]))
        self.lookup = torch.zeros(len(self.bpe.encoder), dtype=torch.long)
        self.lookup[used] = torch.arange(len(used))
        self.vocab_size = len(used)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.lookup[self.bpe(texts)]


class SpeciesClassifier(nn.Module):
    """CoCa's image encoder and a linear head. Takes RGB in [0, 1], NCHW; normalises inside, so
    the exported and compiled artifacts need nothing but a resize in front of them."""

    def __init__(self, visual: nn.Module, embed_dim: int, classes: list[str]):
        super().__init__()
        self.classes = list(classes)
        self.visual = visual
        self.visual.output_tokens = False  # only the pooled (contrastive) embedding
        self.head = nn.Linear(embed_dim, len(classes))
        self.register_buffer("mean", torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1))

    @classmethod
    def from_coca(cls, coca: CoCa, classes: list[str]) -> SpeciesClassifier:
        return cls(coca.visual, coca.visual.output_dim, classes)

    @property
    def image_size(self) -> int:
        return int(self.visual.image_size[0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        normalised = (images - self.mean) / self.std
        if normalised.dtype != images.dtype:  # bf16 images in training meet the float32 buffers
            normalised = normalised.to(images.dtype)
        return self.head(self.visual(normalised))


class SelfAttention(nn.Module):
    """nn.MultiheadAttention's self-attention rebuilt from its weights as separate qkv and output
    projections. Same function, but the heads' total width is free of the model width, so
    structured pruning can remove whole heads (nn.MultiheadAttention ties them together)."""

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        width = attention.embed_dim
        self.num_heads = attention.num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        with torch.no_grad():
            self.qkv.weight.copy_(attention.in_proj_weight)
            self.qkv.bias.copy_(attention.in_proj_bias)
            self.proj.weight.copy_(attention.out_proj.weight)
            self.proj.bias.copy_(attention.out_proj.bias)

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None):
        """nn.MultiheadAttention's call, as open_clip's blocks make it (self-attention: key and
        value are the query)."""
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("SelfAttention attends a sequence to itself: key and value must be the query")
        batch, tokens, _ = query.shape
        q, k, v = self.qkv(query).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(heads.transpose(1, 2).reshape(batch, tokens, -1)), None
