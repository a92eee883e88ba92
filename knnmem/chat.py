"""Prompts for instruction models: a user message or a conversation in the tokenizer's chat template, or plain text."""

from __future__ import annotations


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, prompt: str, *, chat: bool | None = None, answer_prefix: str = "") -> list[int]:
    """Token ids of `prompt`: as a user turn of the chat template followed by the assistant's turn (with
    `chat`, by default whenever the tokenizer has a template), else the text itself.

    `answer_prefix` starts the answer (e.g. "The pass key is"), so the model continues it.

    Raises:
        ValueError: `chat=True` with a tokenizer that has no chat template.
    """
    chat = has_chat_template(tokenizer) if chat is None else chat
    if chat and not has_chat_template(tokenizer):
        raise ValueError("this tokenizer has no chat template: generate without --chat (plain text prompts)")
    if not chat:
        return tokenizer(prompt + (" " + answer_prefix if answer_prefix else ""))["input_ids"]
    return encode_messages(tokenizer, [{"role": "user", "content": prompt}], answer_prefix=answer_prefix)


def encode_messages(tokenizer, messages: list[dict], *, answer_prefix: str = "") -> list[int]:
    """Token ids of a conversation (`{"role", "content"}` dicts) ending with the assistant's turn to answer.

    A tokenizer without a chat template (a base model) gets the messages' contents as plain text, one per
    line, for the model to continue.
    """
    if not has_chat_template(tokenizer):
        text = "\n".join(message["content"] for message in messages)
        return tokenizer(text + (" " + answer_prefix if answer_prefix else ""))["input_ids"]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text + answer_prefix, add_special_tokens=False)["input_ids"]


def user_turn_end(tokenizer) -> str:
    """The template's text between the user's message and the assistant's answer."""
    marker = "\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True)
    return text.split(marker, 1)[1]
