"""Conversation templates, tokenisation with expanded image tokens, and label masking.

A conversation is LLaVA's list of turns ``[{"from": "human"|"gpt"|"system", "value": str}, …]``; ``<image>`` in a
human turn marks where the image goes. :func:`encode_conversation` renders it with a template into pieces
``(text or ids, supervised)``, tokenises each piece on its own (so a prompt tokenises the same in training and at
evaluation), expands every ``<image>`` into ``n_image_tokens`` image-token ids, and builds labels: −100 everywhere
except the assistant answers and their end-of-turn token (EOS).

Templates:

- ``plain`` (LLaVA stage 1): ``<image>`` + ``"\\n"``, then the answer + EOS; the question text is dropped.
- ``vicuna_v1`` (LLaVA-1.5 for Vicuna): ``"{system} USER: {q} ASSISTANT: {a}</s>USER: …"``; an empty system
  prompt drops ``"{system} "`` (the shortest prompt with roles).
- ``chat``: the tokenizer's own chat template; each assistant span is the difference between the rendering up to
  that turn with a generation prompt and the rendering including it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pg_analysis.errors import InputError
from pg_analysis.models import tokenizer_adds_bos

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
TEMPLATES = ("plain", "vicuna_v1", "chat")
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Encoded:
    """One tokenised conversation. ``input_ids``/``labels`` are lists of equal length; ``n_images`` is how many
    ``<image>`` placeholders it holds (each already expanded)."""

    input_ids: list[int]
    labels: list[int]
    n_images: int
    truncated: bool = False


def check_conversation(conv: Any, where: str = "conversation", needs_answer: bool = True) -> list[dict[str, str]]:
    """Validate LLaVA turns; return them with roles normalised to ``user``/``assistant``/``system``."""
    if not isinstance(conv, list) or not conv:
        raise InputError(f"{where}: 'conversations' must be a non-empty list of turns")
    turns = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise InputError(f"{where}: turn {i} needs 'from' and 'value'")
        role = ROLES.get(turn["from"])
        if role is None:
            raise InputError(f"{where}: turn {i} has unknown speaker {turn['from']!r} (human, gpt, system)")
        if not isinstance(turn["value"], str):
            raise InputError(f"{where}: turn {i} value must be a string")
        turns.append({"role": role, "content": turn["value"]})
    if needs_answer and not any(t["role"] == "assistant" for t in turns):
        raise InputError(f"{where}: no assistant ('gpt') turn to learn from")
    return turns


def _pieces(turns: list[dict[str, str]], template: str, tokenizer: Any, generation: bool,
            system: str | None = None) -> list[tuple[Any, bool]]:
    """Render into ``(text or [ids], supervised)`` pieces. ``generation``: the turns end with a user turn and the
    pieces end with the assistant prompt. ``system`` replaces the template's default system prompt when the
    conversation has none."""
    if system is not None and template != "plain" and not any(t["role"] == "system" for t in turns):
        turns = [{"role": "system", "content": system}, *turns]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out: list[tuple[Any, bool]] = []
    if template in ("plain", "vicuna_v1") and tokenizer_adds_bos(tokenizer):
        out.append(([tokenizer.bos_token_id], False))
    if template == "plain":
        for t in turns:
            if t["role"] == "user":
                out.append((IMAGE_TOKEN + "\n" if IMAGE_TOKEN in t["content"] else t["content"] + "\n", False))
            elif t["role"] == "assistant":
                out += [(t["content"], True), (eos, True)]
        return out
    if template == "vicuna_v1":
        system = next((t["content"] for t in turns if t["role"] == "system"), VICUNA_SYSTEM)
        if system:  # an empty system prompt renders nothing: the prompt starts at "USER:"
            out.append((system + " ", False))
        for t in turns:
            if t["role"] == "user":
                out.append((f"USER: {t['content']} ASSISTANT:", False))
            elif t["role"] == "assistant":
                out += [(" " + t["content"], True), (eos, True)]
        return out
    if template == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise InputError("template 'chat' needs a tokenizer with a chat template; use plain or vicuna_v1")
        rendered = ""
        for i, t in enumerate(turns):
            if t["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(turns[:i], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(turns[:i + 1], tokenize=False)
            if not prompt.startswith(rendered) or not full.startswith(prompt):
                raise InputError("the tokenizer's chat template does not render turns incrementally")
            out += [(prompt[len(rendered):], False), (full[len(prompt):], True)]
            rendered = full
        if generation:
            prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            out.append((prompt[len(rendered):], False))
        return out
    raise InputError(f"unknown template {template!r}; choose from {TEMPLATES}")


def default_template(tokenizer: Any) -> str:
    """The template a model is prompted with when none is named: its tokenizer's chat template if it has one, else
    Vicuna v1 (LLaVA-1.5's)."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "vicuna_v1"


def _tokenize(text: str, tokenizer: Any, image_token_id: int, n_image_tokens: int) -> tuple[list[int], int]:
    parts = text.split(IMAGE_TOKEN)
    ids: list[int] = []
    for j, part in enumerate(parts):
        if j:
            ids += [image_token_id] * n_image_tokens
        if part:
            ids += tokenizer(part, add_special_tokens=False)["input_ids"]
    return ids, len(parts) - 1


def encode_conversation(conv: Any, tokenizer: Any, template: str, image_token_id: int, n_image_tokens: int,
                        n_images: int, max_length: int | None = None, generation: bool = False,
                        where: str = "conversation", system: str | None = None) -> Encoded:
    """Tokenise one conversation (see module docstring).

    ``n_images`` is the number of images attached to the record (0 or 1 in LLaVA data); it must equal the number
    of ``<image>`` placeholders. ``generation=True`` encodes a prompt that ends where the assistant answer starts
    (the last turn must then be a user turn; labels are all −100). ``system``: a system prompt used when the
    conversation has none (None: the template's default).

    Over ``max_length`` the tail is cut with a warning; if that would cut an image's tokens or every supervised
    token, an :class:`InputError` is raised instead (an answer is never dropped silently).
    """
    turns = check_conversation(conv, where, needs_answer=not generation)
    if generation and turns[-1]["role"] != "user":
        raise InputError(f"{where}: a generation prompt must end with a user turn")
    ids: list[int] = []
    labels: list[int] = []
    placeholders = 0
    for piece, supervised in _pieces(turns, template, tokenizer, generation, system):
        if isinstance(piece, str):
            piece_ids, k = _tokenize(piece, tokenizer, image_token_id, n_image_tokens)
            if k and supervised:
                raise InputError(f"{where}: <image> inside an assistant turn")
            placeholders += k
        else:
            piece_ids = list(piece)
        ids += piece_ids
        labels += piece_ids if supervised else [-100] * len(piece_ids)
    if template == "plain":
        placeholders = sum(t["content"].count(IMAGE_TOKEN) for t in turns if t["role"] == "user")
    if placeholders != n_images:
        raise InputError(f"{where}: {placeholders} <image> placeholder(s) but {n_images} image(s)")
    truncated = False
    if max_length is not None and len(ids) > max_length:
        if image_token_id in ids[max_length:]:
            raise InputError(f"{where}: {len(ids)} tokens exceed max_length {max_length} and would cut the image")
        if not generation and all(x == -100 for x in labels[:max_length]):
            raise InputError(f"{where}: {len(ids)} tokens exceed max_length {max_length}; truncation would drop "
                             "the whole answer")
        if generation:
            raise InputError(f"{where}: prompt of {len(ids)} tokens exceeds max_length {max_length}")
        log.warning("%s: %d tokens truncated to max_length %d (answer cut)", where, len(ids), max_length)
        ids, labels, truncated = ids[:max_length], labels[:max_length], True
    return Encoded(ids, labels, n_images, truncated)


def letter_token_ids(tokenizer: Any, template: str, letters: str = "ABCD") -> list[int]:
    """The first token of each option letter as an answer is tokenised under ``template`` (vicuna_v1 answers
    follow a space), i.e. the ids whose logits the MCQ evaluation compares."""
    prefix = " " if template == "vicuna_v1" else ""
    ids = [tokenizer(prefix + letter, add_special_tokens=False)["input_ids"][0] for letter in letters]
    if len(set(ids)) != len(ids):
        raise InputError(f"option letters {letters} do not start with distinct tokens for this tokenizer")
    return ids


def encoder_decoder_split(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """A decoder-only encoding → an encoder–decoder one: ``(prompt, target)`` where the target is the last
    supervised answer (its tokens as labels) and the prompt everything before it (earlier turns, answers included,
    are context). BLIP-2 and InstructBLIP train on single turns the same way; a multi-turn record teaches its last
    answer only."""
    end = max((i + 1 for i, x in enumerate(labels) if x != -100), default=0)
    if not end:
        raise InputError("a record for an encoder-decoder LM needs a supervised answer")
    start = end
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    return input_ids[:start], labels[start:end]


def image_instruction(conversation: list[dict[str, str]]) -> str:
    """The text of the turn that holds the image, without its placeholder: what InstructBLIP's Q-Former reads
    (``""`` when no turn has one)."""
    for turn in conversation:
        if IMAGE_TOKEN in turn.get("value", ""):
            return " ".join(turn["value"].replace(IMAGE_TOKEN, " ").split())
    return ""
