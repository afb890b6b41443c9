"""Text-aware person search with a trained CLIP re-ID model (tools/extract_features.py --text).

Two searches, by what the query is:

  * image and words: the query image's MIM query becomes "A photo of a s* person <words>.", s* its
    pseudo token f_theta(v); its retrieval feature is compared with the gallery's usual features
    (``WordsQueries``). Needs PromptSG's inversion network and MIM.
  * words only: the prompt "A photo of a person <words>." is embedded by CLIP's text tower T and
    compared with the gallery images' global image embeddings v by cosine: the space L_SupCon ties
    images and prompts in (``ImageEmbeddings``, ``text_tower``, ``cosine_distances``). Any CLIP
    model of this project: PromptSG, or the visual-only CLIP baseline with the frozen text tower
    of the CLIP it was fine-tuned from.
"""
import numpy as np
import torch
from torch import nn

from ..modeling.clip_weights import clip_model_from_config
from ..modeling.prompt import build_prompt_composer, with_words


def words_only_prompt(cfg, words):
    """The words-only query: MODEL.PROMPTSG.SIMPLE_PROMPT with ``words``, "A photo of a person <words>."."""
    return with_words(cfg.MODEL.PROMPTSG.SIMPLE_PROMPT, words)


def composed_prompt_text(cfg, words, placeholder="X"):
    """The image-and-words query as text, s* in place of the placeholder: "A photo of a s* person <words>."."""
    return " ".join("s*" if w == placeholder else w for w in with_words(cfg.MODEL.PROMPTSG.PROMPT, words).split(" "))


def text_tower(model, cfg):
    """CLIP's frozen text tower T for ``model``: its own (PromptSG's checkpoint holds it), else the
    tower of the CLIP file MODEL.CLIP.PRETRAINED, which training never changes (the CLIP baseline)."""
    if model.text is not None:
        return model.text
    clip = cfg.MODEL.CLIP
    if not clip.PRETRAINED:
        raise ValueError("the model has no text tower and MODEL.CLIP.PRETRAINED is empty")
    clip_model = clip_model_from_config(cfg)
    p = cfg.MODEL.PROMPTSG
    return build_prompt_composer(clip_model, clip.NAME, p.PROMPT, p.SIMPLE_PROMPT).to(model.device).eval()


def cosine_distances(queries, images):
    """1 - cosine similarity, (Q, N) float32 numpy, of (Q, E) and (N, E) embeddings."""
    q = torch.nn.functional.normalize(torch.as_tensor(queries, dtype=torch.float32), dim=1)
    g = torch.nn.functional.normalize(torch.as_tensor(images, dtype=torch.float32), dim=1)
    return (1 - q @ g.T).numpy().astype(np.float32)


class ImageEmbeddings(nn.Module):
    """``model`` giving CLIP's image embedding v instead of its retrieval feature, for FastReID's test loop."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batched_inputs):
        return self.model.image_embeddings(batched_inputs)


class WordsQueries(nn.Module):
    """``model`` in FastReID's test loop over queries then gallery images, each image's target its
    position: position i < len(words) is a query whose feature is read with ``words[i]``
    (``PromptSG.features_with_words``); the gallery images get the model's usual feature."""

    def __init__(self, model, words):
        super().__init__()
        self.model, self.words = model, list(words)

    def forward(self, batched_inputs):
        positions = torch.as_tensor(batched_inputs["targets"]).tolist()
        is_query = [p < len(self.words) for p in positions]
        if not any(is_query):
            return self.model(batched_inputs)
        query = [i for i, q in enumerate(is_query) if q]
        feats = self.model.features_with_words(_rows(batched_inputs, query),
                                               [self.words[positions[i]] for i in query])
        if len(query) == len(positions):
            return feats
        gallery = [i for i, q in enumerate(is_query) if not q]
        out = feats.new_empty(len(positions), feats.shape[1])
        out[query], out[gallery] = feats, self.model(_rows(batched_inputs, gallery))
        return out


def _rows(batched_inputs, rows):
    """The batch dict restricted to ``rows`` (its tensors indexed, its lists picked)."""
    index = torch.tensor(rows)
    return {key: value[index.to(value.device)] if torch.is_tensor(value) else [value[i] for i in rows]
            for key, value in batched_inputs.items()}
