"""Prompt composition with CLIP's frozen text encoder T(.) (Sec. 4.1).

"A photo of a X person." is tokenised once; the pseudo token s* replaces the token embedding of
the placeholder X, and the text embedding l_p is pooled at the end-of-text (EOT) token. Only the
prompt's real tokens are run through the encoder: its causal mask means no output at or before
EOT depends on the padded tail of CLIP's 77-token context, so the result is the same.

Text-aware search (tools/extract_features.py --text) adds words to either prompt, before its full
stop (``with_words``): "A photo of a s* person carrying a red backpack." and, without an image,
"A photo of a person carrying a red backpack." (``embed_texts``).
"""
import open_clip
import torch
import torch.nn.functional as F
from torch import nn


class PromptComposer(nn.Module):
    """Frozen CLIP text tower that embeds a prompt with a pseudo word token in it.

    Args:
        clip_model: an open_clip ``CLIP`` model; its text tower is shared, never trained.
        tokenizer: open_clip tokenizer of that model.
        prompt: prompt with one placeholder word, e.g. "A photo of a X person.".
        simple_prompt: prompt without placeholder, e.g. "A photo of a person.".
        placeholder: the placeholder word in ``prompt``.
    """

    def __init__(self, clip_model, tokenizer, prompt="A photo of a X person.",
                 simple_prompt="A photo of a person.", placeholder="X"):
        super().__init__()
        if getattr(clip_model, "text_pool_type", "argmax") != "argmax":
            raise ValueError("PromptComposer needs a CLIP text tower pooled at the EOT token (argmax)")
        self.token_embedding = clip_model.token_embedding
        self.positional_embedding = clip_model.positional_embedding
        self.transformer = clip_model.transformer
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        for p in self.parameters():
            p.requires_grad_(False)

        ids = tokenizer([prompt])[0]
        placeholder_ids = tokenizer([placeholder])[0]
        # [SOS, X, EOT, 0, ...]: X must be a single BPE token.
        if int((placeholder_ids > 0).sum()) != 3:
            raise ValueError(f"placeholder {placeholder!r} is not a single token for this tokenizer")
        matches = (ids == placeholder_ids[1]).nonzero().flatten()
        if len(matches) != 1:
            raise ValueError(f"prompt {prompt!r} must contain the placeholder {placeholder!r} exactly once")
        self.placeholder_index = int(matches[0])  # 5 for "A photo of a X person."

        prompt_ids, simple_ids = prompt_tokens(tokenizer, prompt), prompt_tokens(tokenizer, simple_prompt)
        self.tokenizer, self.prompt, self.simple_prompt = tokenizer, prompt, simple_prompt
        self._words_ids = {}  # words -> token ids of the prompt with those words, up to EOT
        self.register_buffer("prompt_ids", prompt_ids.clone(), persistent=False)
        self.register_buffer("simple_ids", simple_ids.clone(), persistent=False)
        self.prompt_eot, self.simple_eot = len(prompt_ids) - 1, len(simple_ids) - 1  # Python ints: no device sync
        self._simple_cache = {}  # per device: the simplified prompt's embedding, the token-embedding norm
        self.register_load_state_dict_post_hook(lambda module, keys: module._simple_cache.clear())

    @property
    def width(self):
        """Token-embedding width D of the text tower (the width of s*)."""
        return self.token_embedding.weight.shape[1]

    @property
    def embed_dim(self):
        """Width E of the joint image-text space."""
        proj = self.text_projection
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    def token_norm(self):
        """Mean norm of the token embeddings (0-dim tensor on their device), computed once."""
        weight = self.token_embedding.weight
        key = ("token_norm", weight.device)
        if key not in self._simple_cache:
            with torch.no_grad():
                self._simple_cache[key] = weight.float().norm(dim=1).mean()
        return self._simple_cache[key]

    def train(self, mode=True):
        """The text tower stays in eval mode: it is frozen."""
        return super().train(False)

    def forward(self, token_embeddings, eot_index, return_tokens=False):
        """Run the text tower on (B, n, D) token embeddings with the EOT token at ``eot_index`` (an
        int, or a (B,) tensor: one per sequence).

        Returns the pooled EOT embedding (B, E) and, if ``return_tokens``, every token
        projected to the joint space (B, n, E).
        """
        n = token_embeddings.shape[1]
        x = token_embeddings + self.positional_embedding[:n].to(token_embeddings.dtype)
        causal = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        x = self.transformer(x, attn_mask=causal)
        x = self.ln_final(x)
        tokens = self._project(x)                    # (B, n, E)
        if isinstance(eot_index, int):
            pooled = tokens[:, eot_index]
        else:
            pooled = tokens[torch.arange(len(tokens), device=tokens.device), eot_index]
        return (pooled, tokens) if return_tokens else pooled

    def _project(self, x):
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection

    def compose(self, pseudo_tokens, return_tokens=False, words=""):
        """Embed "A photo of a s* person." for each pseudo token s* in (B, D).

        ``words``, one string for the batch or one per s*, are added to the prompt: "A photo of a
        s* person <words>.". Prompts of different lengths are padded after their EOT token (the
        causal mask keeps the padding from changing anything at or before it); they have no common
        token sequence, so ``return_tokens`` needs prompts of one length.
        """
        rows = [words] if isinstance(words, str) else list(words)
        ids = [self.prompt_ids if not w else self.prompt_ids_with(w).to(self.prompt_ids.device) for w in rows]
        lengths = [len(i) for i in ids]
        n, same = max(lengths), min(lengths) == max(lengths)
        if return_tokens and not same:
            raise ValueError("compose: return_tokens needs prompts of one length")
        # (1, n) for one string (a view: the training path stays as cheap as it was), else (B, n)
        ids = ids[0][None] if len(ids) == 1 else torch.stack([F.pad(i, (0, n - len(i))) for i in ids])
        batch = pseudo_tokens.shape[0]   # not len(): a symbolic size under torch.export (ONNX)
        base = self.token_embedding(ids).to(pseudo_tokens.dtype).expand(batch, -1, -1)
        p = self.placeholder_index
        x = torch.cat([base[:, :p], pseudo_tokens[:, None, :], base[:, p + 1:]], dim=1)   # (B, n, D)
        eot = n - 1 if same else torch.tensor(lengths, device=x.device) - 1
        return self(x, eot, return_tokens)

    def tokenize(self, text):
        """Token ids of ``text`` up to and including EOT; ValueError if it does not fit the context."""
        return prompt_tokens(self.tokenizer, text)

    def prompt_ids_with(self, words):
        """Token ids of the composed prompt with ``words`` (see ``with_words``), computed once per words."""
        if words not in self._words_ids:
            ids = self.tokenize(with_words(self.prompt, words))
            # The words come after the placeholder: the tokens up to it are the prompt's own.
            if not torch.equal(ids[: self.placeholder_index + 1], self.prompt_ids[: self.placeholder_index + 1].cpu()):
                raise ValueError(f"the words {words!r} change the tokens before the placeholder of {self.prompt!r}")
            self._words_ids[words] = ids
        return self._words_ids[words]

    def embed_texts(self, texts):
        """CLIP text embeddings (N, E), float32, of the prompts ``texts`` (no placeholder), each
        pooled at its own EOT token: CLIP's ``encode_text`` before normalisation."""
        device = self.token_embedding.weight.device
        out = []
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            for text in texts:
                ids = self.tokenize(text).to(device)
                out.append(self(self.token_embedding(ids)[None].float(), len(ids) - 1))
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim, device=device)

    def simple(self, batch_size, device, return_tokens=False):
        """Embedding of the simplified prompt (float32), computed once per device and cached."""
        key = (torch.device(device), return_tokens)
        if key not in self._simple_cache:
            with torch.no_grad(), torch.autocast(key[0].type, enabled=False):
                ids = self.simple_ids.to(device)
                out = self(self.token_embedding(ids)[None].float(), self.simple_eot, return_tokens)
                # A copy: a compiled tower's output buffers can be reused by its next call.
                self._simple_cache[key] = tuple(t.clone() for t in out) if return_tokens else out.clone()
        cached = self._simple_cache[key]
        if return_tokens:
            return cached[0].expand(batch_size, -1), cached[1].expand(batch_size, -1, -1)
        return cached.expand(batch_size, -1)


def with_words(prompt, words):
    """``prompt`` with ``words`` added at its end, before its full stop:
    ("A photo of a X person.", "carrying a red backpack") -> "A photo of a X person carrying a red
    backpack."; a full stop ending the words is dropped. Empty words leave ``prompt`` as it is."""
    words = words.strip().rstrip(".").rstrip()
    if not words:
        return prompt
    body, stop = (prompt[:-1], ".") if prompt.endswith(".") else (prompt, "")
    return f"{body} {words}{stop}"


def prompt_tokens(tokenizer, text):
    """Token ids of ``text`` up to and including EOT (1-D); ValueError naming the prompt if it is
    longer than the tokenizer's context (which would cut it short without a word)."""
    count = len(tokenizer.encode(text)) + 2                        # + SOS and EOT
    if count > tokenizer.context_length:
        raise ValueError(f"the prompt {text!r} is {count} tokens, more than the text tower's "
                         f"context of {tokenizer.context_length}")
    ids = tokenizer([text])[0]
    return ids[: int(ids.argmax()) + 1]                           # EOT has the largest id


def build_prompt_composer(clip_model, model_name, prompt, simple_prompt):
    """PromptComposer over ``clip_model``'s text tower with ``model_name``'s tokenizer."""
    return PromptComposer(clip_model, open_clip.get_tokenizer(model_name), prompt, simple_prompt)
